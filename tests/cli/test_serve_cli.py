"""``orion serve``: the real command on 127.0.0.1 (a process of its own), its options, and one clean error line for
what it cannot do."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from orion.cli.main import cli

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")



def one_error_line(result, *fragments) -> str:
    detail = f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.exit_code == 2 and "Traceback" not in result.output, detail
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), detail
    for fragment in fragments:
        assert fragment in lines[0], (fragment, detail)
    return lines[0]


def test_without_the_serve_extra_it_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now fails, as where it is not installed
    monkeypatch.delitem(sys.modules, "orion.serve.app", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path / "no-model-needed")])
    one_error_line(result, "pip install 'orion-ane[serve]'", "uvicorn")  # before the model is even looked for


@pytest.mark.parametrize("specs, words", [
    (["fox"], "is not NAME=PATH"), (["=/some/path"], "is not NAME=PATH"), (["fox="], "is not NAME=PATH"),
    (["fox=/a", "fox=/b"], "used twice"), (["MODEL=/a"], "other than the base model's id"),
])
def test_a_bad_adapter_option_is_one_error_line(tmp_path, specs, words):
    model = str(tmp_path / "model")
    args = ["serve", "--model", model] + [a for s in specs for a in ("--adapter", s.replace("MODEL", model))]
    one_error_line(CliRunner().invoke(cli, args), words)


def test_options_reach_the_server_and_a_public_address_without_a_key_is_warned(tiny_gpt2_dir,
                                                                               tiny_gpt2_adapters, monkeypatch):
    import orion.serve.app

    calls = []
    monkeypatch.setattr(orion.serve.app, "serve", lambda model, model_id, **kw: calls.append(
        (model.adapters, model_id, kw)))
    args = ["serve", "--model", str(tiny_gpt2_dir), "--adapter", f"fox={tiny_gpt2_adapters['fox']}", "--backend",
            "emulator", "--port", "8123", "--max-queue", "5"]
    public = CliRunner().invoke(cli, args + ["--host", "0.0.0.0"])
    assert public.exit_code == 0, public.output
    assert "warning: listening on 0.0.0.0 without an API key" in public.stderr
    assert calls[-1] == (["fox"], str(tiny_gpt2_dir), dict(host="0.0.0.0", port=8123, api_key=None, max_queue=5,
                                                           draft=None, draft_tokens=4))
    keyed = CliRunner().invoke(cli, args, env={"ORION_API_KEY": "from-env"})
    assert keyed.exit_code == 0 and "warning" not in keyed.stderr
    assert calls[-1][2] == dict(host="127.0.0.1", port=8123, api_key="from-env", max_queue=5, draft=None,
                              draft_tokens=4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_orion_serve_answers_on_127_0_0_1_until_interrupted(tiny_gpt2_dir, tiny_gpt2_adapters):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "ORION_API_KEY": "secret"}
    server = subprocess.Popen([sys.executable, "-m", "orion.cli.main", "serve", "--model", str(tiny_gpt2_dir),
                               "--adapter", f"fox={tiny_gpt2_adapters['fox']}", "--backend", "emulator",
                               "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "orion serve did not start"
            try:
                if httpx.get(url + "/health", headers={"Authorization": "Bearer secret"}).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 401  # the key from ORION_API_KEY guards it
        client = openai.OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0)
        assert [m.id for m in client.models.list().data] == [str(tiny_gpt2_dir), "fox"]
        answer = client.completions.create(model="fox", prompt="Once upon a time", max_tokens=5, temperature=0)
        printed = CliRunner().invoke(cli, ["generate", "--model", str(tiny_gpt2_dir), "--adapter",
                                           str(tiny_gpt2_adapters["fox"]), "--prompt", "Once upon a time",
                                           "--max-tokens", "5", "--temperature", "0", "--backend", "emulator"])
        assert "Once upon a time" + answer.choices[0].text + "\n" == printed.stdout
    finally:
        server.send_signal(signal.SIGINT)
        _, log = server.communicate(timeout=60)
    assert server.returncode == 0, log
    assert f"on http://127.0.0.1:{port}/v1" in log
