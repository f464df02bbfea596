"""The ASGI application of ``orion serve`` (Starlette) and the uvicorn server that runs it.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``: server-sent
events), ``GET /health``, ``GET /metrics``. Every answer that is not a success is an OpenAI error body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from contextlib import asynccontextmanager

from orion.errors import OrionError

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as exc:
    raise OrionError(f"`orion serve` needs the serve extra ({exc.name} is missing): "
                     "pip install 'orion-ane[serve]'") from None

from orion.models.speculative import DEFAULT_DRAFT_TOKENS
from orion.serve import protocol
from orion.serve.engine import Engine, Finished, Job, QueueFull, ShuttingDown
from orion.serve.protocol import ApiError

#: Largest request body read (a prompt the size of any model's context is far smaller).
MAX_BODY_BYTES = 8 * 2**20


def create_app(model, model_id: str, *, api_key: str | None = None, max_queue: int = 32, draft=None,
               draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> Starlette:
    """The application serving ``model`` (a TextGenerator with every adapter already loaded) as ``model_id``, its
    adapters under their names; with ``api_key``, every route wants ``Authorization: Bearer <api_key>``; with a
    ``draft`` model, every request decodes speculatively (see :class:`~orion.serve.engine.Engine`)."""
    models = {model_id: None, **{name: name for name in model.adapters}}

    @asynccontextmanager
    async def lifespan(app):
        app.state.engine = Engine(model, max_queue, draft=draft, draft_tokens=draft_tokens)
        try:
            yield
        finally:
            await asyncio.to_thread(app.state.engine.close)

    async def list_models(request):
        return JSONResponse({"object": "list", "data": [_model_card(name, model_id) for name in models]})

    async def get_model(request):
        name = request.path_params["name"]
        if name not in models:
            raise ApiError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(_model_card(name, model_id))

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def metrics(request):
        adapters = [name for name, adapter in models.items() if adapter is not None]
        return JSONResponse({"model": model_id, "adapters": adapters, **request.app.state.engine.snapshot()})

    async def completions(request):
        return await _generate(request, protocol.COMPLETION, model, models)

    async def chat_completions(request):
        return await _generate(request, protocol.CHAT, model, models)

    routes = [Route("/v1/models", list_models), Route("/v1/models/{name:path}", get_model),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/health", health), Route("/metrics", metrics)]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error})
    if api_key:
        app.add_middleware(RequireApiKey, key=api_key)
    return app


def serve(model, model_id: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 32, draft=None, draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM: uvicorn finishes the answers under way, then returns)."""
    app = create_app(model, model_id, api_key=api_key, max_queue=max_queue, draft=draft, draft_tokens=draft_tokens)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info")).run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it caught again once it has shut down: a normal end
        pass


def _model_card(name: str, base: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "orion",
            "parent": None if name == base else base}


async def _generate(request, kind: str, model, models: dict) -> Response:
    engine: Engine = request.app.state.engine
    body = await _json_body(request)
    call = await asyncio.to_thread(protocol.parse, kind, body, model, models)  # tokenizing is CPU work
    job = Job(call.request, asyncio.get_running_loop())
    try:
        engine.submit(job)
    except QueueFull as exc:
        raise ApiError(429, str(exc), code="queue_full", kind="rate_limit_error") from None
    except ShuttingDown as exc:
        raise protocol.generation_error(exc) from None
    if call.stream:
        # the background task runs however the response ends, even when the client left before it began
        return StreamingResponse(_events(call, job, engine), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"}, background=BackgroundTask(engine.cancel, job))
    collect = asyncio.ensure_future(_collect(job))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        collect.cancel()
        engine.cancel(job)  # frees the device at once if the client left first; nothing once the job has ended
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)  # nobody reads it: the client is gone
    text, finished = collect.result()
    return JSONResponse(protocol.response(call, text, finished))


async def _collect(job: Job) -> tuple[str, Finished]:
    pieces = []
    async for event in job:
        if isinstance(event, BaseException):
            raise protocol.generation_error(event)
        if isinstance(event, Finished):
            return "".join(pieces), event
        pieces.append(event)
    raise AssertionError("a job ended without a last event")


async def _disconnected(request) -> None:
    """Returns once the client has gone (the body is read by then, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(call, job: Job, engine: Engine):
    """The server-sent events of a streamed answer, ``data: [DONE]`` last."""
    try:
        opening = protocol.first_chunk(call)
        if opening is not None:
            yield _sse(opening)
        async for event in job:
            if isinstance(event, BaseException):
                yield _sse(protocol.generation_error(event).body())
                return
            if isinstance(event, Finished):
                for chunk in protocol.last_chunks(call, event):
                    yield _sse(chunk)
                yield "data: [DONE]\n\n"
                return
            yield _sse(protocol.text_chunk(call, event))
    finally:
        engine.cancel(job)  # the client left mid-stream: stop the generation before its next token


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _json_body(request):
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


class RequireApiKey:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <key>`` (compared in constant
    time), before any route (or a 404) answers."""

    def __init__(self, app, key: str):
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "a valid API key is required: send the header Authorization: Bearer <key>",
                                 code="invalid_api_key")
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _api_error(request, exc: ApiError) -> JSONResponse:
    return _error_response(exc)


async def _http_error(request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method) as OpenAI errors."""
    reason = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return _error_response(ApiError(exc.status_code, reason.get(exc.status_code, str(exc.detail))))


async def _internal_error(request, exc: Exception) -> JSONResponse:
    """A bug in the server: the client hears a 500 in OpenAI's form, the server log has the traceback."""
    return _error_response(ApiError(500, f"the server failed: {type(exc).__name__}: {exc}", kind="server_error"))
