"""The `mimo` command line. Front ends only print what the one generator yields."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import MimoError

app = typer.Typer(
    help="Run Xiaomi MiMo models locally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dev_app = typer.Typer(help="Developer tools (tiny checkpoints for tests and experiments).", no_args_is_help=True)
app.add_typer(dev_app, name="dev")


def _fail(error: BaseException, debug: bool) -> None:
    if debug:
        raise error
    message = str(error) if isinstance(error, MimoError) else f"{type(error).__name__}: {error}"
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _silence_stdout() -> None:
    """After the reader of our stdout went away: drop further output instead of raising at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _read_prompt(prompt: Optional[str]) -> str:
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if prompt is None:
        raise typer.BadParameter("give a PROMPT, '-' or pipe text on stdin", param_hint="PROMPT")
    return prompt


@app.command()
def run(
    prompt: Optional[str] = typer.Argument(None, help="The prompt; '-' or omitted with a pipe reads stdin."),
    model: Path = typer.Option(..., "--model", "-m", help="Model directory in hub layout."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.6, help="0 = greedy (exact argmax)."),
    top_p: float = typer.Option(0.95, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    mtp: Optional[bool] = typer.Option(
        None, "--mtp/--no-mtp", help="Speculative decoding with the MTP layers (default: on when the checkpoint has them)."
    ),
    draft_tokens: int = typer.Option(0, "--draft-tokens", help="Tokens drafted per step (default: one per MTP layer)."),
    draft_vocab: int = typer.Option(
        0, "--draft-vocab", help="Draft over the first N token ids only (cheaper drafts, still lossless; 0 = all)."
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object at the end instead of text."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
):
    """Generate a completion for PROMPT and stream it to stdout."""
    from .engine import Engine
    from .generate import DoneEvent
    from .sampling import SamplingSettings

    text = _read_prompt(prompt)
    settings = SamplingSettings(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        max_tokens=max_tokens,
        stop=list(stop),
    )
    try:
        settings.validate()
        if draft_tokens < 0 or draft_vocab < 0:
            raise MimoError("--draft-tokens and --draft-vocab must be >= 0")
        engine = Engine.load(model, device=device, dtype=dtype, show_progress=sys.stderr.isatty())
        speculation = engine.speculation(mtp, draft_tokens, draft_vocab)
        events = engine.stream(engine.prompt_ids(text, system=system, raw=raw), settings, **speculation)
        stats = None
        for event in events:
            if isinstance(event, DoneEvent):
                stats = event.stats
            elif not as_json and event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        if as_json:
            sys.stdout.write(json.dumps(stats.as_dict(), ensure_ascii=False) + "\n")
        else:
            sys.stdout.write("\n")
            typer.echo(_stats_line(engine, stats), err=True)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130)
    except (MimoError, OSError, RuntimeError, ValueError) as error:
        _fail(error, debug)


def _stats_line(engine, stats) -> str:
    config, itemsize = engine.config, engine.model.dtype.itemsize
    kv = f"KV {config.kv_bytes_per_token(itemsize) / 1024:.1f} KiB/token"
    if config.kv_fixed_bytes(itemsize):
        kv += f" + {config.kv_fixed_bytes(itemsize) / 1e6:.1f} MB sliding"
    line = (
        f"[{config.display_family} {engine.path.name}] prompt {stats.prompt_tokens} tok "
        f"{stats.prefill_tokens_per_s:.1f} tok/s | generated {stats.completion_tokens} tok "
        f"{stats.decode_tokens_per_s:.1f} tok/s | {kv} | finish: {stats.finish_reason}"
    )
    if stats.speculation:
        line += f" | MTP accepted length {stats.speculation.mean_accepted_length:.2f}"
    return line


@app.command()
def chat(
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Alias, hub repo id, demo model or directory (default: mimo-nano)."
    ),
    system: str = typer.Option("", help="System prompt (MiMo's recommendation: none)."),
    max_tokens: int = typer.Option(2048, "--max-tokens", "-n", help="Most tokens per answer."),
    temperature: float = typer.Option(0.6, help="0 = greedy (exact argmax)."),
    top_p: float = typer.Option(0.95, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    think: bool = typer.Option(True, "--think/--no-think", help="Let the model reason first (shown folded)."),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context size in tokens (default: the model's, at most 32768)."),
    drop_oldest: bool = typer.Option(
        False, "--drop-oldest", help="When the context is full, drop the oldest turns instead of refusing."
    ),
    load: Optional[str] = typer.Option(None, "--load", help="Start from a saved session."),
    mtp: Optional[bool] = typer.Option(
        None, "--mtp/--no-mtp", help="Speculative decoding with the MTP layers (default: on when the checkpoint has them)."
    ),
    draft_tokens: int = typer.Option(0, "--draft-tokens", help="Tokens drafted per step (default: one per MTP layer)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
    yes: bool = typer.Option(False, "--yes", "-y", help="Pull a missing hub model without asking."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
):
    """Chat in the terminal (a plain line REPL when stdin or stdout is not a terminal)."""
    from .chat.launch import ChatOptions, start_chat
    from .chat.settings import ChatSettings
    from .hub import resolve_model

    try:
        settings = ChatSettings(
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
            seed=seed, max_tokens=max_tokens, think=think, overflow="drop" if drop_oldest else "refuse",
        ).validate()
        if draft_tokens < 0:
            raise MimoError("--draft-tokens must be >= 0")
        options = ChatOptions(settings, system, mtp, draft_tokens, ctx, device, dtype, load)
        start_chat(model, lambda name: resolve_model(name, assume_yes=yes), options)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except (MimoError, OSError, RuntimeError, ValueError) as error:
        _fail(error, debug)


@dev_app.command("make-tiny")
def make_tiny(
    out: Path = typer.Argument(..., help="Directory to write."),
    preset: str = typer.Option("mimo", help="mimo | mimo_v2_flash | mimo-bench | mimo_v2_flash-bench"),
    fp8: bool = typer.Option(False, "--fp8", help="FP8 e4m3 weights with 128x128 block scales."),
    shards: int = typer.Option(2, help="Number of safetensors shards (1 = model.safetensors)."),
    seed: int = typer.Option(0),
):
    """Write a random-weight checkpoint in the exact hub layout (for tests and benchmarks)."""
    from .dev.tiny import make_checkpoint

    try:
        path = make_checkpoint(out, preset, fp8=fp8, shards=shards, seed=seed)
    except MimoError as error:
        _fail(error, False)
    typer.echo(str(path))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
