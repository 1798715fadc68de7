"""`mimo serve --idle-timeout`: the server exits once nobody has used it for a while (what keeps a
`mimo run --keep-alive` model loaded between calls, and frees its memory afterwards)."""

from __future__ import annotations

import threading
import time
from typing import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

QUIET_PATHS = {"/health", "/metrics", "/"}  # probes do not keep a server alive


class IdleClock:
    """ASGI middleware: how long since the last API request ended (0 while one is open)."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.open = 0
        self.last = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http" or scope["path"] in QUIET_PATHS:
            return await self.app(scope, receive, send)
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1
            self.last = time.monotonic()

    def idle_seconds(self) -> float:
        return 0.0 if self.open else time.monotonic() - self.last


def exit_when_idle(clock: IdleClock, seconds: float, ready: Callable[[], bool], stop: Callable[[], None]) -> None:
    """Calls `stop` once the server has been idle `seconds` (loading the model does not count)."""

    def watch():
        while True:
            time.sleep(min(1.0, seconds / 4))
            if not ready():
                clock.last = time.monotonic()
            elif clock.idle_seconds() >= seconds:
                stop()
                return

    threading.Thread(target=watch, name="mimo-idle", daemon=True).start()
