"""``orion serve --draft`` and ``--quantize``: the real command (its model handed to a server on 127.0.0.1), answers
equal to ``orion generate`` with the same options, the draft's acceptance in /metrics, and bad values refused."""

from __future__ import annotations

import contextlib

import pytest
from click.testing import CliRunner

from orion.cli.main import cli
from tests.cli.test_serve_cli import one_error_line

PROMPT = "Once upon a time"
NEW = 10


def generated(model_dir, *options) -> str:
    """The text ``orion generate`` prints after PROMPT."""
    result = CliRunner().invoke(cli, ["generate", "--model", str(model_dir), "--prompt", PROMPT, "--max-tokens",
                                      str(NEW), "--backend", "emulator", *options])
    assert result.exit_code == 0, result.output
    return result.stdout[len(PROMPT):-1]


@contextlib.contextmanager
def served(monkeypatch, model_dir, adapters: dict, *options):
    """``orion serve --model model_dir --adapter ... *options``, its model behind a real server while the block
    runs (the command's own ``serve`` call is replaced by one that yields the running server)."""
    import threading

    import orion.serve.app
    from tests.serve.harness import API_KEY, RunningServer

    ready, done, box = threading.Event(), threading.Event(), {}

    def serve(model, model_id, **kw):
        kw.pop("host"), kw.pop("port"), kw.pop("api_key")
        with RunningServer(orion.serve.app.create_app(model, model_id, api_key=API_KEY, **kw)) as running:
            box["server"] = running
            ready.set()
            done.wait(300)

    monkeypatch.setattr(orion.serve.app, "serve", serve)
    args = ["serve", "--model", str(model_dir), "--backend", "emulator", *options]
    args += [a for name, folder in adapters.items() for a in ("--adapter", f"{name}={folder}")]
    command = threading.Thread(target=lambda: box.update(result=CliRunner().invoke(cli, args)), daemon=True)
    command.start()
    while not ready.wait(0.05):
        assert command.is_alive(), box["result"].output
    try:
        yield box["server"]
    finally:
        done.set()
        command.join(60)
    assert box["result"].exit_code == 0, box["result"].output


def complete(server, model: str, **settings) -> str:
    return server.client().completions.create(model=model, prompt=PROMPT, max_tokens=NEW, **settings).choices[0].text


def test_drafted_answers_are_the_targets_for_the_base_and_every_adapter(monkeypatch, tiny_gpt2_dir,
                                                                       tiny_gpt2_adapters):
    """The model drafting for a second copy of itself: greedy answers equal the target alone (the adapter applied
    to the target, not lost to the draft) and ``orion generate --draft``; the base model keeps every drafted token,
    an adapter (the draft stays the base) fewer; sampled answers equal ``orion generate --draft`` with that seed."""
    base = str(tiny_gpt2_dir)
    draft = ["--draft", base, "--draft-tokens", "3"]
    greedy = {base: generated(tiny_gpt2_dir, "--temperature", "0")}
    greedy.update({name: generated(tiny_gpt2_dir, "--temperature", "0", "--adapter", str(folder))
                   for name, folder in tiny_gpt2_adapters.items()})
    assert len(set(greedy.values())) == len(greedy)  # each adapter changes the text
    sampled = generated(tiny_gpt2_dir, "--temperature", "0.9", "--seed", "5", "--adapter",
                        str(tiny_gpt2_adapters["fox"]), *draft)
    with served(monkeypatch, tiny_gpt2_dir, tiny_gpt2_adapters, *draft) as server:
        assert server.engine.draft is not None and server.engine.draft.adapters == []
        m = server.metrics()
        assert m["draft"] == {"draft_tokens": 3, "drafted": 0, "accepted": 0, "acceptance": 0.0}
        for model, text in greedy.items():
            before = server.metrics()["draft"]
            assert complete(server, model, temperature=0) == text, model
            if model == base:
                assert text == generated(tiny_gpt2_dir, "--temperature", "0", *draft)
            m = server.metrics()
            drafted, accepted = (m["draft"][k] - before[k] for k in ("drafted", "accepted"))
            assert m["last_generation"]["drafted"] == drafted > 0 and m["last_generation"]["accepted"] == accepted
            assert (accepted == drafted) if model == base else (accepted < drafted), (model, accepted, drafted)
            assert m["last_generation"]["target_passes"] < NEW  # verify passes that kept several tokens
        assert complete(server, "fox", temperature=0.9, seed=5) == sampled
        m = server.metrics()
        assert m["draft"]["acceptance"] == m["draft"]["accepted"] / m["draft"]["drafted"]
        built = [p for m in (server.engine.model, server.engine.draft) for p in m._all_programs()]
        assert m["compiles"] + m["cache_hits"] == len(built) > 0 and m["backend"] == "emulator"  # the draft's too
        for model in [*greedy, *reversed(list(greedy))]:
            assert complete(server, model, temperature=0) == greedy[model]  # switching builds nothing
        after = server.metrics()
        assert (after["compiles"], after["cache_hits"]) == (m["compiles"], m["cache_hits"])


def test_quantized_answers_equal_orion_generate_quantize(monkeypatch, tiny_gpt2_dir, tiny_gpt2_adapters):
    options = ["--quantize", "int4/32", "--keep-fp16", "h1_*"]
    sampling = ["--temperature", "0.8", "--top-k", "40", "--seed", "3"]
    fox = {"fox": tiny_gpt2_adapters["fox"]}
    want = {"base": generated(tiny_gpt2_dir, *sampling, *options),
            "fox": generated(tiny_gpt2_dir, *sampling, "--adapter", str(fox["fox"]), *options)}
    assert want["base"] != generated(tiny_gpt2_dir, *sampling)  # the compression shows in the text
    with served(monkeypatch, tiny_gpt2_dir, fox, *options) as server:
        for model, text in ((str(tiny_gpt2_dir), want["base"]), ("fox", want["fox"])):
            assert complete(server, model, temperature=0.8, seed=3, extra_body={"top_k": 40}) == text, model


@pytest.mark.parametrize("options, words", [
    (["--quantize", "int3"], "unknown weight scheme 'int3'"),
    (["--quantize", "int4/x"], "scheme/block such as int4/32"),
    (["--keep-fp16", "h1_*"], "--keep-fp16 needs --quantize"),
    (["--draft", "/nonexistent/folder"], "no such model folder"),
])
def test_bad_speedup_options_are_one_error_line(tiny_gpt2_dir, options, words):
    one_error_line(CliRunner().invoke(cli, ["serve", "--model", str(tiny_gpt2_dir), "--backend", "emulator",
                                            *options]), words)


def test_draft_tokens_below_one_is_refused(tiny_gpt2_dir):
    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_gpt2_dir), "--draft", str(tiny_gpt2_dir),
                                      "--draft-tokens", "0"])
    assert result.exit_code == 2 and "--draft-tokens" in result.stderr and "Traceback" not in result.output


def test_a_draft_every_request_would_refuse_is_refused_before_serving(tiny_gpt2_dir):
    from orion.errors import OrionError
    from orion.serve.engine import Engine
    from tests.serve.harness import load_model

    with load_model(tiny_gpt2_dir, {}) as model:
        with pytest.raises(OrionError, match="another model object"):
            Engine(model, draft=model)
        with load_model(tiny_gpt2_dir, {}) as draft:
            with pytest.raises(OrionError, match="draft_tokens must be an integer >= 1"):
                Engine(model, draft=draft, draft_tokens=0)
            draft.tokenizer = type("Small", (), {"vocab_size": 7})()
            with pytest.raises(OrionError, match="the draft's tokenizer has 7 tokens"):
                Engine(model, draft=draft)
