"""The ASGI app: both APIs, /health and /metrics, API keys, body limits, errors in each API's shape,
one log line per request."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import MimoError
from . import ollama_api, openai_api
from .service import BadRequest, Loading, ModelNotFound, Service
from .worker import QueueFull

log = logging.getLogger("mimo.serve")

RETRY_AFTER_SECONDS = 5


def error_response(request: Request, status: int, message: str, kind: str, param=None, code=None,
                   headers=None) -> JSONResponse:
    if request.url.path.startswith("/api/"):  # Ollama's shape
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """413 for a body over the limit, whether or not it says its length up front."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(scope, receive, send)
        # Read the body here (it is small by then) so that one sent without a length is counted too.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], then=receive), send)

    async def _too_large(self, scope, receive, send):
        request = Request(scope, receive)
        response = error_response(request, 413, f"request body over {self.limit} bytes", "invalid_request_error",
                                  code="request_too_large")
        await response(scope, receive, send)


def _replay(messages: list[dict], then: Receive | None = None) -> Receive:
    """A receive() that gives `messages` first, then waits on `then` (a disconnect, later)."""
    pending = list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


def create_app(service: Service, load=None, on_load_error=None) -> FastAPI:
    """`load`: called in a thread at start-up, returns (engine, speculation); /health says 503 until
    it has. `on_load_error(error)`: what to do when it fails (the CLI stops the server)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load is not None:
            def load_model():
                try:
                    service.attach(*load())
                    log.info("model %s loaded", service.settings.model_name)
                except BaseException as error:  # noqa: BLE001 - reported to the front end
                    if on_load_error is None:
                        raise
                    on_load_error(error)
            threading.Thread(target=load_model, name="mimo-load", daemon=True).start()
        yield
        if service.worker is not None:
            service.worker.stop()

    app = FastAPI(title="mimo-local", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    settings = service.settings

    app.add_middleware(AuthorizeAndLog, service=service)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problem = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in problem.get("loc", ())[1:]) or None
        message = problem.get("msg", "invalid request")
        if problem.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        return error_response(request, 400, f"{where + ': ' if where else ''}{message}", "invalid_request_error",
                              param=where)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest):
        return error_response(request, 400, str(error), "invalid_request_error", error.param, error.code)

    @app.exception_handler(ModelNotFound)
    async def not_found(request: Request, error: ModelNotFound):
        return error_response(request, 404, str(error), "invalid_request_error", "model", "model_not_found")

    @app.exception_handler(Loading)
    async def loading(request: Request, error: Loading):
        return error_response(request, 503, str(error), "server_error", headers={"Retry-After": "1"})

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull):
        return error_response(request, 503, f"the server is busy: {settings.max_queue} requests are already waiting "
                              "(--max-queue); retry later", "server_error", code="queue_full",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(MimoError)
    async def refused(request: Request, error: MimoError):
        return error_response(request, 400, str(error), "invalid_request_error")

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception):
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(error).__name__, error)
        return error_response(request, 500, f"internal error: {type(error).__name__}: {error}", "server_error")

    @app.get("/health")
    async def health():
        if not service.ready:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        if service.worker is not None:
            service.metrics.observe(service.worker)
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def root():
        return Response("mimo-local is running", media_type="text/plain")

    app.include_router(openai_api.router(service))
    app.include_router(ollama_api.router(service))
    return BodyLimit(app, settings.max_body_bytes)


class AuthorizeAndLog:
    """The API key check (401 without it, /health excepted), and one log line and request count per
    response, at its status line. Plain ASGI: a streamed answer's chunks pass through untouched
    (starlette's BaseHTTPMiddleware moved each one through a task and a memory stream)."""

    def __init__(self, app: ASGIApp, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request = Request(scope)
        api_key = self.service.settings.api_key
        if api_key and scope["path"] != "/health":
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                response = error_response(request, 401, "invalid or missing API key (Authorization: Bearer KEY)",
                                          "authentication_error", code="invalid_api_key")
                self._log(request, response.status_code, started)
                return await response(scope, receive, send)

        async def logged_send(message):
            if message["type"] == "http.response.start":
                self._log(request, message["status"], started)
            await send(message)

        await self.app(scope, receive, logged_send)

    def _log(self, request: Request, status: int, started: float) -> None:
        route = request.scope.get("route")  # the route's template: no label per made-up path
        self.service.metrics.requests.labels(getattr(route, "path", "other"), str(status)).inc()
        log.info("%s %s %d %.1f ms", request.method, request.url.path, status, (time.perf_counter() - started) * 1000)
