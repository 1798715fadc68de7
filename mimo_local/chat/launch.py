"""Start a chat: load the model, build the session, and pick the front end for this terminal."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import MimoError
from .controller import ChatController
from .session import ChatSession
from .settings import ChatSettings


@dataclass
class ChatOptions:
    settings: ChatSettings
    system: str = ""
    mtp: bool | None = None
    draft_tokens: int = 0
    context: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    load_session: str | None = None
    quant: str | None = None  # a recipe applied while loading
    placement: object | None = None  # an offload PlanRequest (expert placement flags)
    server: str | None = None  # a running `mimo serve` to talk to instead of loading a model
    api_key: str | None = None
    mmap: bool = True
    mlock: bool = False


def start_chat(model_name: str, resolve: Callable[..., Path], options: ChatOptions) -> None:
    """`resolve(name, ask=...)` turns a model name into its directory (the hub's job); only the first
    model, loaded before the app takes the terminal, may ask before pulling."""
    from ..engine import Engine
    from ..offload.hotness import save_recorded
    from . import store

    interactive = sys.stdin.isatty() and sys.stdout.isatty()

    def load_engine(name: str, ask: bool = False):
        if options.server:
            raise MimoError(f"this chat runs on {options.server}: the server's model is the one it has loaded")
        return Engine.load(resolve(name, ask=ask), device=options.device, dtype=options.dtype,
                           show_progress=sys.stderr.isatty(), quant=options.quant, placement=options.placement,
                           mmap=options.mmap, mlock=options.mlock)

    if options.server:
        from ..serve.client import RemoteEngine

        engine = RemoteEngine(options.server, options.api_key)
        model_name = engine.name
    else:
        engine = load_engine(model_name, ask=True)
    session = ChatSession(
        engine,
        display_name(model_name, engine),
        options.settings,
        system=options.system,
        mtp=options.mtp,
        draft_tokens=options.draft_tokens,
        context=options.context,
    )
    if options.load_session:
        session.restore(store.load_session(options.load_session))
    controller = ChatController(session, load_engine)
    try:
        if interactive:
            from .app import ChatApp

            ChatApp(controller, device=str(engine.model.device)).run()
        else:
            from .repl import run_repl

            run_repl(controller, sys.stdin, sys.stdout, sys.stderr)
    finally:
        if not options.server:
            save_recorded(controller.session.engine.model, controller.session.engine.path)  # router statistics


def display_name(model_name: str | None, engine) -> str:
    return model_name if model_name and not Path(model_name).expanduser().is_dir() else engine.path.name
