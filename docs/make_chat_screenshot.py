"""Regenerate docs/chat.svg: `mimo chat` driven by Textual's Pilot against the scripted tiny chat
checkpoint (mimo_local/dev/scripted_chat.py), exported with App.save_screenshot.

    python docs/make_chat_screenshot.py
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from mimo_local.chat.app import ChatApp, ChatInput
from mimo_local.chat.controller import ChatController
from mimo_local.chat.session import ChatSession
from mimo_local.chat.settings import ChatSettings
from mimo_local.dev.scripted_chat import make_scripted_chat_checkpoint
from mimo_local.engine import Engine

HERE = Path(__file__).resolve().parent


async def drive(app: ChatApp) -> None:
    async with app.run_test(size=(120, 30)) as pilot:
        for line in ["hi", "/think off", "hello again", "/stats"]:
            app.query_one(ChatInput).load_text(line)
            await pilot.press("enter")
            await pilot.pause(0.2)
            while app.generating:
                await pilot.pause(0.05)
            await pilot.pause(0.2)
        app.save_screenshot(filename="chat.svg", path=str(HERE))


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["MIMO_HOME"] = scratch
        model = make_scripted_chat_checkpoint(Path(scratch) / "mimo-scripted-demo")
        session = ChatSession(Engine.load(model), model.name, ChatSettings())
        asyncio.run(drive(ChatApp(ChatController(session, Engine.load), device="cpu")))
    print(HERE / "chat.svg")


if __name__ == "__main__":
    main()
