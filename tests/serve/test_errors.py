"""Every bad request gets a 4xx with an OpenAI error body, and nothing it sends brings the server down; the API key
guards every route."""

from __future__ import annotations

import pytest

from tests.serve.harness import openai

PROMPT = "Once upon a time"
GOOD = {"prompt": PROMPT, "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
BASE = object()  # stands for the base model's id, which is a temporary folder


def body(base: str, fields: dict, template: dict = GOOD) -> dict:
    return {"model": base, **template, **fields}


# (path, request body: a dict of fields changed from a good one, or raw bytes) -> (status, param or None, words)
BAD = [
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", b"\xff\xfe", 400, None, "not valid JSON"),
    ("/v1/completions", {"model": None}, 400, "model", "model is required"),
    ("/v1/completions", {"model": "no-such-adapter"}, 404, "model", "does not exist"),
    ("/v1/chat/completions", {"model": "dog"}, 404, "model", "does not exist"),
    ("/v1/completions", {"max_tokens": -1}, 400, "max_tokens", ">= 1"),
    ("/v1/completions", {"max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("/v1/completions", {"max_tokens": 10**9}, 400, "max_tokens", "context is 128 tokens"),
    ("/v1/completions", {"max_tokens": 125}, 400, "max_tokens", "context is 128 tokens"),
    ("/v1/completions", {"max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"max_tokens": True}, 400, "max_tokens", "integer"),
    ("/v1/chat/completions", {"max_completion_tokens": 10**6, **CHAT}, 400, "max_completion_tokens",
     "context is 128"),
    ("/v1/completions", {"prompt": "the fox " * 100}, 400, "prompt", "no room for an answer"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the fox " * 100}]}, 400, "messages",
     "no room for an answer"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "must be a string"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "batches"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, 400, "prompt", "token arrays"),
    ("/v1/completions", {"n": 2}, 400, "n", "exactly one choice"),
    ("/v1/chat/completions", {"n": 3, **CHAT}, 400, "n", "exactly one choice"),
    ("/v1/completions", {"temperature": -1}, 400, "temperature", "[0, 2]"),
    ("/v1/completions", {"temperature": "hot"}, 400, "temperature", "number"),
    ("/v1/completions", {"top_p": 0}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {"top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {"top_k": -5}, 400, "top_k", ">= 1"),
    ("/v1/completions", {"top_k": 0.5}, 400, "top_k", "integer"),
    ("/v1/completions", {"seed": -1}, 400, "seed", "[0, 2**63)"),
    ("/v1/completions", {"seed": "x"}, 400, "seed", "integer"),
    ("/v1/completions", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "1 to 4"),
    ("/v1/completions", {"stop": ""}, 400, "stop", "non-empty"),
    ("/v1/completions", {"stop": 3}, 400, "stop", "string"),
    ("/v1/completions", {"logprobs": 2}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"echo": True}, 400, "echo", "not supported"),
    ("/v1/chat/completions", {"presence_penalty": 0.5, **CHAT}, 400, "presence_penalty", "not supported"),
    ("/v1/chat/completions", {"tools": [{"type": "function"}], **CHAT}, 400, "tools", "not supported"),
    ("/v1/completions", {"stream": "yes"}, 400, "stream", "true or false"),
    ("/v1/completions", {"stream": True, "stream_options": "usage"}, 400, "stream_options", "include_usage"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages", "non-empty list"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0]", "text content"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0]", "string role"),
]


@pytest.mark.parametrize("path, fields, status, param, words", BAD,
                         ids=[f"{p.rsplit('/', 1)[-1]}-{f if isinstance(f, bytes) else ','.join(f)}-{i}"
                              for i, (p, f, *_) in enumerate(BAD)])
def test_a_bad_request_gets_a_4xx_openai_error(server, tiny_gpt2_dir, path, fields, status, param, words):
    template = CHAT if path.endswith("chat/completions") else GOOD
    content = fields if isinstance(fields, bytes) else body(str(tiny_gpt2_dir), fields, template)
    answer = server.post(path, content)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert words in error["message"] and error["param"] == param
    assert server.get("/health").status_code == 200


def test_the_good_request_those_are_made_from_is_served(server, tiny_gpt2_dir):
    assert server.post("/v1/completions", body(str(tiny_gpt2_dir), {})).status_code == 200
    assert server.post("/v1/chat/completions", body(str(tiny_gpt2_dir), {}, CHAT)).status_code == 200
    assert server.post("/v1/completions", body(str(tiny_gpt2_dir), {"top_k": 0, "presence_penalty": 0.0,
                                                                     "logprobs": None, "n": 1})).status_code == 200


def test_routes_and_methods_that_do_not_exist(server):
    missing = server.get("/v1/nothing")
    assert missing.status_code == 404 and "no route /v1/nothing" in missing.json()["error"]["message"]
    wrong = server.get("/v1/completions")
    assert wrong.status_code == 405 and "GET is not allowed" in wrong.json()["error"]["message"]


def test_a_body_too_large_is_refused(server, tiny_gpt2_dir):
    from orion.serve.app import MAX_BODY_BYTES

    answer = server.post("/v1/completions", b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}')
    assert answer.status_code == 413 and "larger than" in answer.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/health", "/metrics", "/v1/models", "/v1/models/cat", "/v1/nowhere"])
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_every_route_wants_the_api_key(server, path, key):
    answer = server.get(path, key=key)
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
    assert server.get(path).status_code == (404 if "nowhere" in path else 200)


def test_the_api_key_guards_generation_too(server, tiny_gpt2_dir):
    for path, template in (("/v1/completions", GOOD), ("/v1/chat/completions", CHAT)):
        assert server.post(path, body(str(tiny_gpt2_dir), {}, template), key=None).status_code == 401
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model=str(tiny_gpt2_dir), prompt=PROMPT, max_tokens=2)


def test_the_openai_client_raises_its_own_errors(server, tiny_gpt2_dir):
    client = server.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="exactly one choice"):
        client.chat.completions.create(model=str(tiny_gpt2_dir), messages=CHAT["messages"], n=2)


def test_a_failure_inside_a_generation_reaches_the_client_and_the_server_goes_on(server, tiny_gpt2_dir,
                                                                               monkeypatch):
    model = server.engine.model
    original = model.generate_ids

    def failing(*args, **kwargs):
        for i, token in enumerate(original(*args, **kwargs)):
            if i == 1:
                raise RuntimeError("the device fell over")
            yield token

    failed = server.metrics()["requests"]["failed"]
    monkeypatch.setattr(model, "generate_ids", failing)
    request = body(str(tiny_gpt2_dir), {"max_tokens": 4})
    whole = server.post("/v1/completions", request)
    assert whole.status_code == 500
    assert whole.json()["error"]["type"] == "server_error" and "the device fell over" in whole.json()["error"][
        "message"]
    with pytest.raises(openai.APIError, match="the device fell over"):
        list(server.client().completions.create(stream=True, **request))
    monkeypatch.undo()
    assert server.metrics()["requests"]["failed"] == failed + 2
    assert server.post("/v1/completions", request).status_code == 200
