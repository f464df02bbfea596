"""The OpenAI HTTP API's bodies: requests checked field by field into engine requests, results into responses.

A request that cannot be served as asked is refused with an :class:`ApiError` (status and OpenAI-style error body),
never half-served: an option this server does not implement (``n`` > 1, ``logprobs``, penalties, tools, ...) is an
error unless it is given at its no-op value.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from orion.errors import OrionError
from orion.serve.engine import Finished, Request, ShuttingDown

COMPLETION = "text_completion"
CHAT = "chat.completion"
#: OpenAI's default max_tokens for /v1/completions; a chat's default is the rest of the model's context.
DEFAULT_COMPLETION_TOKENS = 16
MAX_STOPS = 4
#: Options this server does not implement, with the values that ask for nothing (these are accepted).
NO_OP_VALUES = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
                "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
                "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"})}


class ApiError(Exception):
    """A refused request: HTTP ``status`` and the OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def generation_error(exc: BaseException) -> ApiError:
    """What a client hears of a failure inside its generation: Orion's own refusals are the request's fault."""
    if isinstance(exc, OrionError):
        return ApiError(503 if isinstance(exc, ShuttingDown) else 400, str(exc))
    return ApiError(500, f"the server failed: {type(exc).__name__}: {exc}", kind="server_error")


@dataclass
class Call:
    """One parsed request: what the engine runs and how the answer is shaped."""

    kind: str  # COMPLETION or CHAT
    model: str  # the id the client asked for, echoed in every response
    request: Request
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage alone
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = self.id or f"{'cmpl' if self.kind == COMPLETION else 'chatcmpl'}-{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())


def parse(kind: str, body, model, models: dict[str, str | None]) -> Call:
    """Check an OpenAI request ``body`` for ``model`` (a TextGenerator) whose servable ids map to their adapter
    (None: the base model); tokenizes the prompt, so run it off the event loop."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    for name, allowed in NO_OP_VALUES.items():
        if name in body and body[name] not in allowed:
            raise ApiError(400, f"{name}={body[name]!r} is not supported by this server", param=name,
                           code="unsupported_parameter")
    requested = body.get("model")
    if not isinstance(requested, str):
        raise ApiError(400, "model is required: the base model's id or an adapter's name (GET /v1/models lists them)",
                       param="model")
    if requested not in models:
        raise ApiError(404, f"the model {requested!r} does not exist; this server has {', '.join(models)}",
                       param="model", code="model_not_found")
    n = body.get("n")
    if n is not None and (_integer(n) is None or n != 1):
        raise ApiError(400, f"n={n!r}: this server generates exactly one choice per request (n=1)", param="n")
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise ApiError(400, f"stream must be true or false, not {stream!r}", param="stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and options.get("include_usage") in (None, True, False)):
        raise ApiError(400, "stream_options must be an object like {\"include_usage\": true}", param="stream_options")

    source = "prompt" if kind == COMPLETION else "messages"
    if kind == COMPLETION:
        ids = _encode(model, _prompt(body.get("prompt")), source, chat=False)
    else:
        ids = _encode(model, _messages(body.get("messages")), source, chat=True)
    room = model.context_length - len(ids)
    if room < 1:
        raise ApiError(400, f"the {source} is {len(ids)} tokens: this model's context of {model.context_length} tokens "
                       "leaves no room for an answer", param=source, code="context_length_exceeded")
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(max_name)
    if max_tokens is None:
        max_tokens = min(DEFAULT_COMPLETION_TOKENS, room) if kind == COMPLETION else room
    elif _integer(max_tokens, max_name, low=1) > room:
        raise ApiError(400, f"this model's context is {model.context_length} tokens: the {source} has {len(ids)} and "
                       f"{max_name} asks for {max_tokens} more", param=max_name, code="context_length_exceeded")
    max_tokens = int(max_tokens)
    top_k = body.get("top_k")
    top_k = None if top_k is None or top_k in (0, -1) else _integer(top_k, "top_k", low=1)  # 0, -1: no cut (vLLM)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    request = Request(ids=ids, max_tokens=max_tokens, adapter=models[requested],
                      temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_k=top_k,
                      top_p=None if top_p == 1 else top_p, seed=_seed(body.get("seed")), stop=_stops(body.get("stop")))
    return Call(kind, requested, request, stream=bool(stream), include_usage=bool(options and options.get(
        "include_usage")))


def _integer(value, name: str | None = None, low: int | None = None):
    """``value`` if it is an integer (JSON has no other kind of whole number; 3.0 counts) at least ``low``; with no
    ``name``, None instead of an error."""
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float)
                                                                         and value.is_integer())
    if whole and (low is None or value >= low):
        return int(value)
    if name is None:
        return None
    raise ApiError(400, f"{name} must be an integer" + (f" >= {low}" if low is not None else "") + f", got {value!r}",
                   param=name)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not (low < value if low_open else low <= value) or value > high:
        raise ApiError(400, f"{name} must be a number in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}",
                       param=name)
    return float(value)


def _seed(value) -> int | None:
    if value is None:
        return None
    seed = _integer(value)
    if seed is None or not 0 <= seed < 2**63:
        raise ApiError(400, f"seed must be an integer in [0, 2**63), got {value!r}", param="seed")
    return seed


def _stops(value) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOPS \
            or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of 1 to {MAX_STOPS} of them, got {value!r}",
                       param="stop")
    return tuple(stops)


def _prompt(value) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]  # a batch of one
    if not isinstance(value, str):
        raise ApiError(400, "prompt must be a string (or a list of one string); batches and token arrays are not "
                       f"supported, got {type(value).__name__}", param="prompt")
    return value


def _messages(value) -> list[dict]:
    """Chat messages as ``{"role", "content"}`` with text content (a list of text parts is joined)."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    messages = []
    for i, m in enumerate(value):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must be an object with a string role and text content",
                           param=f"messages[{i}]")
        messages.append({"role": m["role"], "content": content})
    return messages


def _encode(model, prompt, param: str, chat: bool) -> list[int]:
    try:
        return model.encode(prompt, chat=chat)
    except OrionError as exc:
        raise ApiError(400, str(exc), param=param) from None


# -- responses ----------------------------------------------------------------------------------------------------


def usage(finished: Finished) -> dict:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


def _choice(call: Call, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
    if call.kind == COMPLETION:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if not call.stream:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _envelope(call: Call, choices: list, usage_: dict | None) -> dict:
    kind = call.kind + (".chunk" if call.stream and call.kind == CHAT else "")
    return {"id": call.id, "object": kind, "created": call.created, "model": call.model, "choices": choices,
            "usage": usage_}


def response(call: Call, text: str, finished: Finished) -> dict:
    """The whole answer of a request that did not stream."""
    return _envelope(call, [_choice(call, text, finished.finish_reason)], usage(finished))


def first_chunk(call: Call) -> dict | None:
    """A chat stream opens with the assistant's role; a completion stream has no such chunk."""
    return _envelope(call, [_choice(call, None, None, first=True)], None) if call.kind == CHAT else None


def text_chunk(call: Call, text: str) -> dict:
    return _envelope(call, [_choice(call, text, None)], None)


def last_chunks(call: Call, finished: Finished) -> list[dict]:
    """The chunk with the finish reason, and the usage: on it, or (``include_usage``, as OpenAI does) alone in a
    chunk of its own after it."""
    if call.include_usage:
        return [_envelope(call, [_choice(call, None, finished.finish_reason)], None),
                _envelope(call, [], usage(finished))]
    return [_envelope(call, [_choice(call, None, finished.finish_reason)], usage(finished))]
