"""A real `mimo serve` app on a free loopback port, served by uvicorn in a thread, for the tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from mimo_local.sampling import SamplingSettings
from mimo_local.serve.launch import ServeOptions, build


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir: Path, model_name: str = "test-model", **fields):
    """Yields (base_url, service). `fields`: ServeOptions fields (api_key, max_queue, context, ...)."""
    fields.setdefault("device", "cpu")
    fields.setdefault("dtype", "float32")
    fields.setdefault("defaults", SamplingSettings(temperature=0.0, max_tokens=64))
    port = free_port()
    options = ServeOptions(model_name, Path(model_dir), port=port, **fields)
    service, app = build(options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("the test server did not become ready")
        time.sleep(0.05)
    try:
        yield base, service
    finally:
        server.should_exit = True
        thread.join(timeout=30)
