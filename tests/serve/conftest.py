"""The server the tests of a module share: the tiny random GPT-2 and its two PEFT adapters (tiny_gpt2_adapters:
other targets, other ranks) behind a real server on 127.0.0.1."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir, tiny_gpt2_adapters):
    """The server the tests of a module share (the model id is the folder as given to --model)."""
    from tests.serve.harness import API_KEY, RunningServer, create_app, load_model  # skips without the extras

    with load_model(tiny_gpt2_dir, tiny_gpt2_adapters) as model, \
            RunningServer(create_app(model, str(tiny_gpt2_dir), api_key=API_KEY, max_queue=32)) as running:
        yield running
