"""One device, many clients: concurrent streams all complete correctly, requests are served in arrival order, the
event loop stays free while the device works, a full queue answers 429, and a client that leaves (killed mid-stream,
or while waiting) frees its place at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from orion.serve.app import create_app
from tests.serve.harness import API_KEY, Gate, RunningServer, load_model, openai, wait_for

PROMPTS = ["Once upon a time", "The cat sat"]
NEW = 4


def test_sixteen_concurrent_streaming_clients_all_get_their_own_answer(server, tiny_gpt2_dir,
                                                                        tiny_gpt2_adapters):
    names = [str(tiny_gpt2_dir), *tiny_gpt2_adapters]
    jobs = [dict(model=names[i % 3], prompt=PROMPTS[i % 2], seed=i, temperature=0.9) for i in range(16)]
    with load_model(tiny_gpt2_dir, tiny_gpt2_adapters) as model:  # the same answers from a model of its own
        want = []
        for job in jobs:
            model.set_adapter(None if job["model"] == names[0] else job["model"])
            want.append(model.generate(job["prompt"], max_tokens=NEW, temperature=0.9, seed=job["seed"]))
    assert len(set(want)) > 8  # seeds and adapters make the answers differ: a mixed-up stream would show

    async def stream(client, job) -> str:
        pieces = []
        async for chunk in await client.completions.create(max_tokens=NEW, stream=True, **job):
            pieces.append(chunk.choices[0].text)
        return "".join(pieces)

    async def all_at_once() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        async with client:
            return await asyncio.gather(*(stream(client, job) for job in jobs))

    done = server.metrics()["requests"]["completed"]
    with Gate(server.engine.model) as gate:  # hold the device until every client waits in the queue
        answers = []
        runner = threading.Thread(target=lambda: answers.extend(asyncio.run(all_at_once())))
        runner.start()
        wait_for(lambda: server.metrics()["queue_depth"] == 15, what="fifteen clients waiting behind one")
        gate.release.set()
        runner.join(120)
    assert answers == want
    assert server.metrics()["requests"]["completed"] == done + 16


def test_requests_are_served_in_arrival_order(server, tiny_gpt2_dir):
    client = server.client(timeout=60)
    prompts = ["The fox", "The cat sat on", "Once upon a time there", "The moon"]
    threads = []
    with Gate(server.engine.model) as gate:
        for i, prompt in enumerate(prompts):
            threads.append(threading.Thread(target=client.completions.create, kwargs=dict(
                model=str(tiny_gpt2_dir), prompt=prompt, max_tokens=2, temperature=0)))
            threads[-1].start()
            wait_for(lambda: server.metrics()["queue_depth"] + server.metrics()["running"] == i + 1,
                     what=f"request {i} to arrive")
        gate.release.set()
        for t in threads:
            t.join(60)
    assert gate.prompts == [server.engine.model.encode(p) for p in prompts]


def test_generation_never_blocks_the_event_loop(server, tiny_gpt2_dir):
    client = server.client(timeout=30)
    with Gate(server.engine.model) as gate:
        chunks = iter(client.completions.create(model=str(tiny_gpt2_dir), prompt=PROMPTS[0], max_tokens=NEW,
                                                stream=True, temperature=0))
        first = next(chunks)
        assert gate.reached.wait(30)  # the device is busy with this generation, held between two tokens...
        assert server.get("/health").json() == {"status": "ok"}  # ...and the server still answers
        busy = server.metrics()
        assert busy["running"] == 1 and busy["queue_depth"] == 0
        gate.release.set()
        rest = list(chunks)
    assert first.choices[0].text and rest[-1].choices[0].finish_reason == "length"


def test_a_full_queue_answers_429_with_an_openai_error(server, tiny_gpt2_dir):
    model_id = str(tiny_gpt2_dir)
    request = dict(model=model_id, prompt=PROMPTS[0], max_tokens=2, temperature=0)
    with RunningServer(create_app(server.engine.model, model_id, api_key=API_KEY, max_queue=2)) as small, \
            Gate(server.engine.model) as gate:
        client = small.client(timeout=60)
        results = []
        waiting = [threading.Thread(target=lambda: results.append(client.completions.create(**request)))
                   for _ in range(3)]  # one on the device, two in the queue
        waiting[0].start()
        assert gate.reached.wait(30)  # the first holds the device
        for t in waiting[1:]:
            t.start()
        wait_for(lambda: small.metrics()["queue_depth"] == 2, what="a full queue")
        refused = small.post("/v1/completions", request)
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_error" and "queue is full" in refused.json()["error"][
            "message"]
        with pytest.raises(openai.RateLimitError):
            client.completions.create(**request)
        gate.release.set()
        for t in waiting:
            t.join(60)
        assert len(results) == 3 and small.metrics()["requests"]["rejected"] == 2
        assert small.post("/v1/completions", request).status_code == 200  # room again once the queue drains


CLIENT = """
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
request = dict(model=sys.argv[3], prompt="Once upon a time", max_tokens=int(sys.argv[4]), temperature=0)
if sys.argv[5] == "stream":
    for chunk in client.completions.create(stream=True, **request):
        print(repr(chunk.choices[0].text), flush=True)
else:
    print("sent", flush=True)
    client.completions.create(**request)
"""


def start_client(server, model_id: str, max_tokens: int, mode: str) -> subprocess.Popen:
    """A client in a process of its own (the openai package), so that it can be killed like a real one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", CLIENT, server.url + "/v1", API_KEY, model_id, str(max_tokens),
                             mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_a_client_killed_mid_stream_frees_the_device_at_once(server, tiny_gpt2_dir):
    model_id = str(tiny_gpt2_dir)
    before = server.metrics()
    with Gate(server.engine.model, after=2, delay=0.05):  # slow tokens: 100 would take 5 seconds
        client = start_client(server, model_id, 100, "stream")
        try:
            assert client.stdout.readline()  # the first piece has arrived
            client.send_signal(signal.SIGKILL)
        finally:
            client.wait(30)
        wait_for(lambda: server.metrics()["requests"]["cancelled"] == before["requests"]["cancelled"] + 1,
                 what="the server to notice the client is gone")
    after = server.metrics()
    assert after["running"] == 0 and after["requests"]["completed"] == before["requests"]["completed"]
    assert after["last_generation"]["completion_tokens"] < 50  # stopped long before its 100 tokens
    answer = server.client().completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
    assert answer.choices[0].finish_reason == "length"  # the server goes on serving


def test_a_client_killed_while_waiting_leaves_the_queue_at_once(server, tiny_gpt2_dir):
    model_id = str(tiny_gpt2_dir)
    before = server.metrics()["requests"]
    with Gate(server.engine.model) as gate:
        holder = []
        first = threading.Thread(target=lambda: holder.append(server.client(timeout=60).completions.create(
            model=model_id, prompt=PROMPTS[0], max_tokens=NEW, temperature=0)))
        first.start()
        assert gate.reached.wait(30)
        waiting = start_client(server, model_id, NEW, "whole")
        try:
            wait_for(lambda: server.metrics()["queue_depth"] == 1, what="the second client to wait")
            waiting.send_signal(signal.SIGKILL)
        finally:
            waiting.wait(30)
        wait_for(lambda: server.metrics()["queue_depth"] == 0, what="the queue to drop the killed client")
        now = server.metrics()
        assert now["running"] == 1 and now["requests"]["cancelled"] == before["cancelled"] + 1  # the first still runs
        gate.release.set()
        first.join(60)
    assert holder and holder[0].choices[0].finish_reason == "length"
    assert server.metrics()["requests"]["completed"] == before["completed"] + 1  # the killed one never ran
