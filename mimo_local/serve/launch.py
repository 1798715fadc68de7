"""`mimo serve`: load the model once (in the background, /health says 503 meanwhile) and serve it
with uvicorn until Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import uvicorn

from ..budget import DEFAULT_CACHE_RAM
from ..errors import MimoError
from ..sampling import SamplingSettings
from ..sizes import parse_size
from .app import create_app
from .idle import IdleClock, exit_when_idle
from .service import ServeSettings, Service

DEFAULT_CONTEXT = 32768
AUTO_PARALLEL = (4, 2, 1)  # slots tried without --parallel (llama-server also starts 4)
GRACEFUL_SHUTDOWN_SECONDS = 10


@dataclass
class ServeOptions:
    model_name: str
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    context: int | None = None
    max_queue: int = 16
    parallel: int = 1
    cache_ram: int = parse_size(DEFAULT_CACHE_RAM, "--cache-ram")  # bytes of host memory for the prompt cache
    max_body_bytes: int = 4 * 1024 * 1024
    reasoning_format: str = "auto"
    log_prompts: bool = False
    defaults: SamplingSettings | None = None
    mtp: bool | None = None
    draft_tokens: int = 0
    device: str = "auto"
    dtype: str = "auto"
    quant: str | None = None
    placement: object | None = None  # an offload PlanRequest
    mmap: bool = True
    mlock: bool = False
    idle_timeout: float | None = None  # seconds without requests before the server exits


class Server(uvicorn.Server):
    """uvicorn's server, except that Ctrl-C or SIGTERM ends it with exit code 0 once in-flight requests
    are done (uvicorn raises the signal again after its shutdown, which kills the process)."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {number: signal.signal(number, self.handle_exit) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def context_size(requested: int | None, model_limit: int) -> int:
    context = requested or min(model_limit, DEFAULT_CONTEXT)
    if not 16 <= context <= model_limit:
        raise MimoError(f"--ctx must be between 16 and {model_limit} for this model")
    return context


def auto_parallel(model_dir: Path, placement, device: str, dtype: str, quant: str | None) -> int:
    """The most slots, of AUTO_PARALLEL, whose KV caches fit beside the model in the memory plan
    (1 when none does: loading then says why)."""
    from ..engine import plan_load
    from ..loader import resolve_device, resolve_dtype

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    for slots in AUTO_PARALLEL:
        if plan_load(model_dir, dataclasses.replace(placement, sequences=slots), torch_device, torch_dtype, quant).fits:
            return slots
    return 1


def load_engine(options: ServeOptions):
    from ..engine import Engine

    engine = Engine.load(options.model_dir, device=options.device, dtype=options.dtype, quant=options.quant,
                         placement=options.placement, mmap=options.mmap, mlock=options.mlock)
    return engine, engine.speculation(options.mtp, options.draft_tokens)


def build(options: ServeOptions, engine_loader: Callable | None = None, on_load_error=None):
    """The service and its ASGI app (tests serve this with their own uvicorn)."""
    from ..config import load_config

    config = load_config(options.model_dir)
    settings = ServeSettings(
        model_name=options.model_name, context=context_size(options.context, config.max_position_embeddings),
        max_queue=options.max_queue, parallel=options.parallel, cache_ram=options.cache_ram,
        reasoning_format=options.reasoning_format,
        defaults=options.defaults or SamplingSettings(), api_key=options.api_key,
        max_body_bytes=options.max_body_bytes, log_prompts=options.log_prompts,
    )
    service = Service(settings)
    app = create_app(service, load=engine_loader or (lambda: load_engine(options)), on_load_error=on_load_error)
    return service, app


def serve(options: ServeOptions, on_message: Callable[[str], None] = print) -> int:
    """Runs until interrupted; returns the exit code (1 when the model failed to load)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if not is_loopback(options.host) and not options.api_key:
        on_message(f"warning: serving on {options.host} without --api-key: anyone who reaches this address "
                   "can use the model")
    failure: list[BaseException] = []
    server: Server | None = None

    def stop_on_load_error(error: BaseException) -> None:
        failure.append(error)
        server.should_exit = True

    service, app = build(options, on_load_error=stop_on_load_error)
    if options.idle_timeout:
        app = clock = IdleClock(app)

        def stop_when_idle() -> None:
            on_message(f"mimo serve: no request for {options.idle_timeout:g} s (--idle-timeout): exiting")
            server.should_exit = True

        exit_when_idle(clock, options.idle_timeout, lambda: service.ready, stop_when_idle)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    server = Server(config)
    on_message(f"mimo serve: {options.model_name} on http://{options.host}:{options.port} "
               f"(OpenAI API under /v1, Ollama API under /api; {options.parallel} parallel "
               f"slot{'s' if options.parallel > 1 else ''}; loading the model...)")
    server.run()
    if failure:
        error = failure[0]
        message = str(error) if isinstance(error, MimoError) else f"{type(error).__name__}: {error}"
        on_message(f"error: {message}")
        return 1
    return 0
