"""What the server tests share: a real server on 127.0.0.1 (uvicorn on a free port, in a thread of the test
process), a gate that holds the device between two tokens, and polling."""

from __future__ import annotations

import json
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import orion  # noqa: E402
from orion.serve.app import create_app  # noqa: E402

API_KEY = "test-key"


class RunningServer:
    """uvicorn serving ``app`` on 127.0.0.1, port chosen by the system, until the block ends."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    @property
    def engine(self):
        return self.app.state.engine

    def client(self, **options) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, **options)

    def get(self, path: str, key: str | None = API_KEY) -> "httpx.Response":
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)

    def post(self, path: str, content, key: str | None = API_KEY) -> "httpx.Response":
        """POST raw bytes (or a JSON-able object) as JSON."""
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        return httpx.post(self.url + path, content=data, headers=headers, timeout=30)

    def metrics(self) -> dict:
        return self.get("/metrics").json()

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)


def load_model(model_dir, adapters: dict):
    model = orion.load(str(model_dir), backend="emulator")
    for name, folder in adapters.items():
        model.load_adapter(folder, name)
    return model


class Gate:
    """While the block runs, every generation of ``model`` stops after ``after`` tokens until ``release`` is set
    (or, with ``delay``, sleeps that long before each later token); ``prompts`` records the prompts in the order the
    device took them."""

    def __init__(self, model, after: int = 1, delay: float | None = None):
        self.model, self.after, self.delay = model, after, delay
        self.reached, self.release = threading.Event(), threading.Event()
        self.prompts: list[list[int]] = []

    def __enter__(self):
        original = self.model.generate_ids

        def generate_ids(ids, *args, **kwargs):
            self.prompts.append(list(ids))
            for i, token in enumerate(original(ids, *args, **kwargs)):
                if i >= self.after:
                    self.reached.set()
                    if self.delay is not None:
                        time.sleep(self.delay)
                    elif not self.release.wait(60):
                        raise TimeoutError("the test never released the gate")
                yield token

        self.model.generate_ids = generate_ids  # on the instance: the class's method is untouched
        return self

    def __exit__(self, *exc):
        self.release.set()
        del self.model.generate_ids


def wait_for(condition, timeout: float = 30.0, what: str = "the condition"):
    """Poll ``condition()`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
