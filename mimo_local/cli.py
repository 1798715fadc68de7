"""The `mimo` command line. Front ends only print what the one generator yields."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from . import early_read
from .budget import DEFAULT_CACHE_RAM
from .errors import MimoError
from .offload import options as offload_options
from .options import (debug_option, device_option, draft_tokens_option, dtype_option, min_p_option, mtp_option,
                      repetition_penalty_option, seed_option, temperature_option, top_k_option, top_p_option,
                      quant_option, mmap_option, mlock_option, server_option, api_key_option, yes_option,
                      cache_type_option, keep_alive_option)
from .sizes import parse_duration, parse_size

app = typer.Typer(
    help="Run Xiaomi MiMo models locally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        typer.echo(f"mimo-local {version('mimo-local')}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")):
    """Run Xiaomi MiMo models locally."""


dev_app = typer.Typer(help="Developer tools (tiny checkpoints for tests and experiments).", no_args_is_help=True)
app.add_typer(dev_app, name="dev")


def _fail(error: BaseException, debug: bool) -> None:
    if debug:
        raise error
    if isinstance(error, MimoError):
        message = str(error)
    elif isinstance(error, OSError) and error.strerror:
        message = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        message = f"{type(error).__name__}: {error}"
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


class FrontEnd:
    """Interrupts, out-of-memory and errors of a command, handled the same way everywhere:
    `with FrontEnd(debug) as front:` and, once a model is placed, `front.plan = engine.plan` (an
    out-of-memory then says what the plan counted)."""

    def __init__(self, debug: bool, interrupted: str = "interrupted"):
        self.debug, self.interrupted, self.plan = debug, interrupted, None

    def __enter__(self) -> "FrontEnd":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None or isinstance(error, (typer.Exit, typer.Abort)):
            return False
        if isinstance(error, BrokenPipeError):  # the reader of our stdout went away (`| head`)
            _silence_stdout()
            return True
        if isinstance(error, KeyboardInterrupt):
            typer.echo(f"\n{self.interrupted}", err=True)
            raise typer.Exit(130)
        if type(error).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
            first_line = f"out of memory: {error}".splitlines()[0]
            error = MimoError(self.plan.oom_message() if self.plan else
                              first_line + " (see `mimo plan` for a placement that fits)")
        if isinstance(error, (MimoError, OSError, RuntimeError, ValueError)):
            _fail(error, self.debug)
        return False


def _silence_stdout() -> None:
    """After the reader of our stdout went away: drop further output instead of raising at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _read_prompt(prompt: Optional[str]) -> str:
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        data = sys.stdin.buffer.read()
    elif prompt is None:
        raise typer.BadParameter("give a PROMPT, '-' or pipe text on stdin", param_hint="PROMPT")
    else:
        data = prompt.encode("utf-8", "surrogateescape")  # argv bytes as the shell passed them
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MimoError(f"the prompt is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
                        "convert it first, e.g. with iconv") from None


@app.command()
def run(
    prompt: Optional[str] = typer.Argument(None, help="The prompt; '-' or omitted with a pipe reads stdin."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Alias, hub repo id org/name[@revision], demo model or directory (default: mimo-nano "
        "or `mimo config default-model`)."
    ),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens to generate."),
    temperature: float = temperature_option(),
    top_p: float = top_p_option(),
    top_k: int = top_k_option(),
    min_p: float = min_p_option(),
    repetition_penalty: float = repetition_penalty_option(),
    seed: Optional[int] = seed_option(),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    think: Optional[bool] = typer.Option(
        None, "--think/--no-think", help="Let the model reason first, or not. Default: the model's chat template "
        "decides (MiMo-V2-Flash: off; MiMo-V2.5, V2.6: on)."
    ),
    ignore_eos: bool = typer.Option(
        False, "--ignore-eos", help="Go on past end-of-text tokens up to --max-tokens (benchmarks, long outputs)."
    ),
    mtp: Optional[bool] = mtp_option(),
    draft_tokens: int = draft_tokens_option(),
    draft_vocab: Optional[int] = typer.Option(
        None, "--draft-vocab", help="Draft over the first N (most frequent) token ids and those the conversation used: "
        "cheaper drafts, still lossless. Default 32768 for vocabularies over 65536; 0 = the whole vocabulary."
    ),
    device: str = device_option(),
    dtype: str = dtype_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object at the end instead of text."),
    yes: bool = yes_option(),
    quant: Optional[str] = quant_option(),
    mmap: bool = mmap_option(),
    mlock: bool = mlock_option(),
    gpu_mem: Optional[str] = offload_options.gpu_mem_option(),
    cpu_mem: Optional[str] = offload_options.cpu_mem_option(),
    cpu_moe: bool = offload_options.cpu_moe_option(),
    n_cpu_moe: int = offload_options.n_cpu_moe_option(),
    override_tensor: list[str] = offload_options.override_tensor_option(),
    cache_type: str = cache_type_option(),
    server: Optional[str] = server_option(),
    api_key: Optional[str] = api_key_option(),
    keep_alive: Optional[str] = keep_alive_option(),
    debug: bool = debug_option(),
):
    """Generate a completion for PROMPT and stream it to stdout."""
    from .budget import context_estimate
    from .sampling_settings import SamplingSettings

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
    with FrontEnd(debug) as front:
        text = _read_prompt(prompt)
        settings.validate()
        _check_raw(raw, system, think)
        if draft_tokens < 0 or (draft_vocab or 0) < 0:
            raise MimoError("--draft-tokens and --draft-vocab must be >= 0")
        keep_seconds = parse_duration(keep_alive, "--keep-alive") if keep_alive and not server else 0
        if server:
            return _run_on_server(server, text, settings, model, system, raw, think, ignore_eos, api_key, as_json)
        model_dir = _resolve_model_for_run(model, yes)
        if keep_seconds:
            if draft_vocab is not None:
                raise MimoError("--draft-vocab cannot go with --keep-alive (the background server drafts with its default)")
            serve_flags = _serve_flags(device, dtype, quant, mmap, mlock, gpu_mem, cpu_mem, cpu_moe, n_cpu_moe,
                                       override_tensor, cache_type, mtp, draft_tokens)
            kept = _kept_server(model_dir, serve_flags, keep_seconds)
            return _run_on_server(kept.url, text, settings, kept.model, system, raw, think, ignore_eos, kept.api_key,
                                  as_json, label=f"{model_dir.name}, kept loaded by pid {kept.pid}")
        load_options = json.dumps([device, dtype, quant, gpu_mem, cpu_mem, cpu_moe, n_cpu_moe, override_tensor])
        if mmap:  # the disk reads the weights while torch is imported below
            early_read.start(model_dir, load_options)
        from .engine import Engine
        from .generate import DoneEvent
        from .offload.hotness import save_recorded
        from .prefill_bar import PrefillBar

        context = context_estimate(text + (system or ""), max_tokens)
        placement = offload_options.placement_request(gpu_mem, cpu_mem, cpu_moe, n_cpu_moe, override_tensor, ctx=context,
                                                      mtp=mtp, clamp_ctx=True, ctx_flag=None, cache_type=cache_type)
        engine = Engine.load(model_dir, device=device, dtype=dtype, show_progress=sys.stderr.isatty(), quant=quant,
                             placement=placement, mmap=mmap, mlock=mlock)
        if getattr(engine.model, "mapped_files", None) is not None:
            early_read.record(model_dir, load_options, engine.model.mapped_files.used_spans())
        front.plan = engine.plan
        speculation = engine.speculation(mtp, draft_tokens, draft_vocab)
        with PrefillBar() as bar:
            events = engine.stream(engine.prompt_ids(text, system=system, raw=raw, thinking=think), settings,
                                   eos_ids=() if ignore_eos else None, on_prefill=bar, **speculation)
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
        save_recorded(engine.model, engine.path)


def _check_raw(raw: bool, system: Optional[str], think: Optional[bool]) -> None:
    """--raw leaves out the chat template, and with it the system prompt and the thinking switch."""
    if raw and system:
        raise MimoError("--raw sends the prompt as it is, without the chat template: --system cannot go with it")
    if raw and think is not None:
        raise MimoError("--raw sends the prompt as it is, without the chat template: --think/--no-think cannot go with it")


def _serve_flags(device, dtype, quant, mmap, mlock, gpu_mem, cpu_mem, cpu_moe, n_cpu_moe, override_tensor, cache_type,
                 mtp, draft_tokens) -> list[str]:
    """`mimo run`'s load flags as `mimo serve` takes them (a kept server is found by them)."""
    flags = ["--device", device, "--dtype", dtype, "--cache-type", cache_type, "--draft-tokens", str(draft_tokens)]
    flags += ["--quant", quant] if quant else []
    flags += [] if mmap else ["--no-mmap"]
    flags += ["--mlock"] if mlock else []
    flags += ["--gpu-mem", gpu_mem] if gpu_mem else []
    flags += ["--cpu-mem", cpu_mem] if cpu_mem else []
    flags += ["--cpu-moe"] if cpu_moe else []
    flags += ["--n-cpu-moe", str(n_cpu_moe)] if n_cpu_moe else []
    flags += [flag for pattern in override_tensor for flag in ("--override-tensor", pattern)]
    flags += [] if mtp is None else ["--mtp" if mtp else "--no-mtp"]
    return flags


def _kept_server(model_dir: Path, serve_flags: list[str], keep_seconds: float):
    from rich.console import Console

    from .serve.keep_alive import find_or_start

    console = Console(stderr=True)
    with contextlib.ExitStack() as waiting:
        def on_wait(message: str) -> None:
            if console.is_terminal:
                waiting.enter_context(console.status(message))
            else:
                console.print(message, highlight=False)

        return find_or_start(model_dir, serve_flags, keep_seconds, on_wait=on_wait)


def _run_on_server(url, text, settings, model, system, raw, think, ignore_eos, api_key, as_json, label=None) -> None:
    from .serve.client import remote_run

    for piece in remote_run(url, text, settings, model=model, system=system, raw=raw, thinking=think,
                            ignore_eos=ignore_eos, api_key=api_key):
        if isinstance(piece, dict):
            stats = piece
        elif not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if as_json:
        sys.stdout.write(json.dumps(stats, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n")
        typer.echo(f"[{label or url}] prompt {stats['prompt_tokens']} tok {stats['prefill_tokens_per_s']:.1f} tok/s | "
                   f"generated {stats['completion_tokens']} tok {stats['decode_tokens_per_s']:.1f} tok/s | "
                   f"finish: {stats['finish_reason']}", err=True)
    sys.stdout.flush()


def _resolve_model_for_run(model: Optional[str], assume_yes: bool) -> Path:
    from .store.names import default_model
    from .store.resolve import resolve_model

    if model is None:
        typer.echo(f"model: {default_model()} (default; change with `mimo config default-model NAME`)", err=True)
    return resolve_model(model, assume_yes=assume_yes)


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
def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to measure (as for `mimo run`)."),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", "-p", help="Prompt length of the pp test."),
    gen_tokens: int = typer.Option(128, "--gen-tokens", "-n", help="Tokens generated in the tg test (greedy, "
                                   "end-of-text ignored)."),
    repetitions: int = typer.Option(3, "--repetitions", "-r", help="Timed runs, after one warm-up run."),
    mtp: Optional[bool] = mtp_option(),
    draft_tokens: int = draft_tokens_option(),
    device: str = device_option(),
    dtype: str = dtype_option(),
    quant: Optional[str] = quant_option(),
    mmap: bool = mmap_option(),
    mlock: bool = mlock_option(),
    gpu_mem: Optional[str] = offload_options.gpu_mem_option(),
    cpu_mem: Optional[str] = offload_options.cpu_mem_option(),
    cpu_moe: bool = offload_options.cpu_moe_option(),
    n_cpu_moe: int = offload_options.n_cpu_moe_option(),
    override_tensor: list[str] = offload_options.override_tensor_option(),
    cache_type: str = cache_type_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    yes: bool = yes_option(),
    debug: bool = debug_option(),
):
    """Prompt-processing (pp) and generation (tg) speed of a model, as llama-bench measures them."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from .bench import backend, check_counts, measure, weight_bytes_by_device
    from .engine import Engine

    with FrontEnd(debug) as front:
        check_counts(prompt_tokens, gen_tokens, repetitions)
        if draft_tokens < 0:
            raise MimoError("--draft-tokens must be >= 0")
        model_dir = _resolve_model_for_run(model, yes)
        placement = offload_options.placement_request(gpu_mem, cpu_mem, cpu_moe, n_cpu_moe, override_tensor,
                                                      ctx=prompt_tokens + gen_tokens + 8, mtp=mtp, clamp_ctx=True, ctx_flag=None,
                                                      cache_type=cache_type)
        engine = Engine.load(model_dir, device=device, dtype=dtype, show_progress=sys.stderr.isatty(), quant=quant,
                             placement=placement, mmap=mmap, mlock=mlock)
        speculation = engine.speculation(mtp, draft_tokens)
        with Progress(console=Console(stderr=True), transient=True, disable=as_json or not sys.stderr.isatty()) as progress:
            task = progress.add_task("bench", total=repetitions + 1)
            front.plan = engine.plan
            results = measure(engine, prompt_tokens, gen_tokens, repetitions, speculation,
                              on_run=lambda: progress.advance(task))
    weights = weight_bytes_by_device(engine)
    mode = f"MTP, up to {speculation['draft_tokens']} drafts" if speculation["draft_tokens"] else "no MTP"
    if as_json:
        typer.echo(json.dumps({"model": engine.path.name, "dtype": str(engine.model.dtype).removeprefix("torch."),
                               "quant": quant, "weights": weights, "decoding": mode, "backend": backend(engine),
                               "results": [result.as_dict() for result in results]}))
        return
    placed = ", ".join(f"{name} {size / 1e9:.2f} GB" for name, size in weights.items())
    table = Table(title=f"{engine.path.name} ({str(engine.model.dtype).removeprefix('torch.')}"
                        f"{', ' + quant if quant else ''}; weights: {placed}; {mode}; {backend(engine)})")
    for column in ("test", "tokens/s", "runs"):
        table.add_column(column, justify="right")
    for result in results:
        speed = f"{result.mean:.2f} ± {result.stdev:.2f}" + (" (unreliable)" if result.unreliable else "")
        if result.mean_accepted_length is not None:
            speed += f" (accepted length {result.mean_accepted_length:.2f})"
        table.add_row(result.test, speed, str(len(result.tokens_per_s)))
    _console().print(table)
    if any(result.unreliable for result in results):
        typer.echo("unreliable: the runs differ by more than 10% of their mean (another program is probably using "
                   "a core); close it or raise --repetitions", err=True)


@app.command()
def pull(
    name: str = typer.Argument(..., help="Alias (mimo-7b-rl, mimo-v2-flash, ...) or hub repo id org/name[@revision]."),
    include: list[str] = typer.Option(
        [], "--include", help="Only files matching this glob (repeatable; without a '/' it matches top-level files only)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Skip files matching this glob (repeatable)."),
    retries: int = typer.Option(5, "--retries", help="Attempts per file after the first, with exponential backoff."),
    read_timeout: Optional[float] = typer.Option(
        None, "--read-timeout", metavar="S",
        help="Give up an attempt after S seconds without data (default: $MIMO_PULL_READ_TIMEOUT, else 60)."),
    min_speed: Optional[float] = typer.Option(
        None, "--min-speed", metavar="BYTES_PER_S",
        help="Give up an attempt slower than this over --read-timeout seconds; 0: no floor "
             "(default: $MIMO_PULL_MIN_SPEED, else 1024)."),
    debug: bool = debug_option(),
):
    """Download a model into the local store: resumable, every file verified (sha256 / git hash)."""
    from .store.pull import pull as pull_model, transfer_limits

    try:
        if retries < 0:
            raise MimoError("--retries must be >= 0")
        pull_model(name, tuple(include), tuple(exclude), retries, transfer_limits(read_timeout, min_speed))
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: run `mimo pull {name}` again to resume", err=True)
        raise typer.Exit(130)
    except (MimoError, OSError) as error:
        _fail(error, debug)


@app.command("list")
def list_models(debug: bool = debug_option()):
    """Models in the local store and the packaged demo models."""

    from .store.local import list_table

    try:
        _console().print(list_table())
    except (MimoError, OSError) as error:
        _fail(error, debug)


@app.command()
def show(
    name: str = typer.Argument(..., help="Model name, hub repo id or directory."),
    debug: bool = debug_option(),
):
    """Summary of a model's configuration: family, layers, heads, experts, context, KV cache per token."""

    from .store.local import show_table

    try:
        _console().print(show_table(name))
    except (MimoError, OSError) as error:
        _fail(error, debug)


@app.command()
def rm(
    name: str = typer.Argument(..., help="A pulled model (alias or hub repo id)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Remove without asking."),
    debug: bool = debug_option(),
):
    """Remove a pulled model from the local store."""
    from .store.pull import format_bytes
    from .store.local import disk_size, remove, removable

    try:
        ref = removable(name)
        question = f"Remove {ref.name} ({format_bytes(disk_size(ref.path))}, {ref.path})?"
        if not yes:
            if not sys.stdin.isatty():
                raise MimoError(f"not removing {ref.name} without confirmation: pass --yes")
            if not typer.confirm(question, err=True):
                raise typer.Exit(1)
        remove(ref)
        typer.echo(f"removed {ref.name}", err=True)
    except (MimoError, OSError) as error:
        _fail(error, debug)


@app.command()
def ps(debug: bool = debug_option()):
    """Models kept loaded by `mimo run --keep-alive`: their servers, flags and idle timeouts."""
    from .serve.keep_alive import running_servers, table

    try:
        servers = running_servers()
        if servers:
            _console().print(table(servers))
        else:
            typer.echo("no model is kept loaded (`mimo run --keep-alive 5m` keeps one)", err=True)
    except (MimoError, OSError) as error:
        _fail(error, debug)


@app.command()
def stop(
    name: Optional[str] = typer.Argument(None, help="Model whose kept servers to end (as for --model)."),
    every: bool = typer.Option(False, "--all", help="End every kept server."),
    debug: bool = debug_option(),
):
    """End the background servers `mimo run --keep-alive` started (they finish the answer in progress)."""
    from .serve.keep_alive import running_servers, stop as stop_server
    from .store.names import parse_name

    try:
        if (name is None) != every:
            raise MimoError("name a model, or pass --all")
        servers = running_servers()
        if name is not None:
            model_dir = parse_name(name).path.resolve()
            servers = [server for server in servers if Path(server.model) == model_dir]
            if not servers:
                raise MimoError(f"{name} is not kept loaded (`mimo ps` lists what is)")
        for server in servers:
            stop_server(server)
            typer.echo(f"stopped {Path(server.model).name} (pid {server.pid})", err=True)
    except (MimoError, OSError) as error:
        _fail(error, debug)


config_app = typer.Typer(help="Settings kept in the store (MIMO_HOME).", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("default-model")
def config_default_model(
    name: Optional[str] = typer.Argument(None, help="Model to use when --model is not given; omit to print it."),
    reset: bool = typer.Option(False, "--reset", help="Go back to the packaged mimo-nano."),
):
    """Print or set the model `mimo run` uses without --model."""
    from .store.names import default_model, set_default_model

    try:
        if reset or name is not None:
            set_default_model(None if reset else name)
            if name is not None and not reset:
                _warn_if_not_downloaded(name)
        typer.echo(default_model())
    except (MimoError, OSError) as error:
        _fail(error, False)


def _warn_if_not_downloaded(name: str) -> None:
    from .store.names import is_complete, parse_name

    ref = parse_name(name)
    if ref.kind == "hub" and not is_complete(ref.path):
        typer.echo(f"warning: {ref.name} is not downloaded yet: `mimo run` will ask to pull it "
                   f"(or run `{ref.pull_command}` now)", err=True)


@app.command()
def chat(
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Alias, hub repo id, demo model or directory (default: mimo-nano)."
    ),
    system: str = typer.Option("", help="System prompt (MiMo's recommendation: none)."),
    max_tokens: int = typer.Option(2048, "--max-tokens", "-n", help="Most tokens per answer."),
    temperature: float = temperature_option(),
    top_p: float = top_p_option(),
    top_k: int = top_k_option(),
    min_p: float = min_p_option(),
    repetition_penalty: float = repetition_penalty_option(),
    seed: Optional[int] = seed_option(),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable): an answer ends before it."),
    raw: bool = typer.Option(False, "--raw", help="No chat template: each message is sent as it is and the model "
                             "continues the conversation's texts put one after the other."),
    think: Optional[bool] = typer.Option(None, "--think/--no-think", help="Let the model reason first (shown "
                                         "folded). Default: on."),
    ignore_eos: bool = typer.Option(
        False, "--ignore-eos", help="Go on past end-of-text tokens up to --max-tokens in every answer."
    ),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context size in tokens (default: the model's, at most 32768)."),
    drop_oldest: bool = typer.Option(
        False, "--drop-oldest", help="When the context is full, drop the oldest turns instead of refusing."
    ),
    load: Optional[str] = typer.Option(None, "--load", help="Start from a saved session."),
    mtp: Optional[bool] = mtp_option(),
    draft_tokens: int = draft_tokens_option(),
    device: str = device_option(),
    dtype: str = dtype_option(),
    quant: Optional[str] = quant_option(),
    mmap: bool = mmap_option(),
    mlock: bool = mlock_option(),
    gpu_mem: Optional[str] = offload_options.gpu_mem_option(),
    cpu_mem: Optional[str] = offload_options.cpu_mem_option(),
    cpu_moe: bool = offload_options.cpu_moe_option(),
    n_cpu_moe: int = offload_options.n_cpu_moe_option(),
    override_tensor: list[str] = offload_options.override_tensor_option(),
    cache_type: str = cache_type_option(),
    server: Optional[str] = server_option(),
    api_key: Optional[str] = api_key_option(),
    yes: bool = yes_option(),
    debug: bool = debug_option(),
):
    """Chat in the terminal (a plain line REPL when stdin or stdout is not a terminal)."""
    from .chat.launch import ChatOptions, start_chat
    from .chat.settings import ChatSettings
    from .store.resolve import resolve_model

    with FrontEnd(debug):
        _check_raw(raw, system, think)
        settings = ChatSettings(
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
            seed=seed, max_tokens=max_tokens, think=think is not False, overflow="drop" if drop_oldest else "refuse",
            stop=tuple(stop), ignore_eos=ignore_eos, raw=raw,
        ).validate()
        if draft_tokens < 0:
            raise MimoError("--draft-tokens must be >= 0")
        placement = offload_options.placement_request(gpu_mem, cpu_mem, cpu_moe, n_cpu_moe, override_tensor,
                                                      ctx=ctx or 32768, mtp=mtp, clamp_ctx=True, cache_type=cache_type)
        options = ChatOptions(settings, system, mtp, draft_tokens, ctx, device, dtype, load, quant, placement, server,
                              api_key, mmap, mlock)
        start_chat(model, lambda name, ask: resolve_model(name, assume_yes=yes, ask=ask), options)


@dev_app.command("make-tiny")
def make_tiny(
    out: Path = typer.Argument(..., help="Directory to write."),
    preset: str = typer.Option("mimo", help="mimo | mimo_v2_flash | mimo-bench | mimo_v2_flash-bench | mimo-7b-full | "
                               "mimo_v2.5 | mimo_v2.6 (the last two in those releases' layouts, always FP8)"),
    fp8: bool = typer.Option(False, "--fp8", help="FP8 e4m3 weights with 128x128 block scales."),
    shards: int = typer.Option(2, help="Number of safetensors shards (1 = model.safetensors)."),
    seed: int = typer.Option(0),
):
    """Write a random-weight checkpoint in the exact hub layout (for tests and benchmarks)."""
    from .dev.tiny import make_checkpoint

    try:
        if shards < 1:
            raise MimoError("--shards must be at least 1")
        path = make_checkpoint(out, preset, fp8=fp8, shards=shards, seed=seed)
    except (MimoError, OSError) as error:
        _fail(error, False)
    typer.echo(str(path))


@app.command()
def quantize(
    source: str = typer.Argument(..., help="bf16 or FP8 checkpoint (FP8 + MXFP4 experts too: those are kept as "
                                 "stored): directory, alias, demo model or hub repo id."),
    recipe: str = typer.Option(..., "--recipe", "-r", help="Shipped recipe name (int8, int4-g128, gptq-int4-g128, "
                               "nf4, bnb-int8, v2flash-mixed) or a YAML file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (rerun to resume an interrupted run)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Text file for GPTQ calibration "
                                               "(default: the text shipped with mimo-local)."),
    calibration_tokens: int = typer.Option(4096, "--calibration-tokens", help="GPTQ calibration tokens."),
    sequence_length: int = typer.Option(512, "--sequence-length", help="GPTQ calibration tokens per sequence."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Quality report against SOURCE at the end."),
    eval_tokens: int = typer.Option(1024, "--eval-tokens", help="Tokens of the eval text in the report."),
    yes: bool = yes_option(),
    debug: bool = debug_option(),
):
    """Quantize SOURCE with a recipe into OUT (GPTQ or bitsandbytes layout), shard by shard.

    Routed experts a checkpoint stores as MXFP4 (MiMo-V2.6) are kept as stored (already 4.25 bits:
    requantizing would only add error); the recipe quantizes everything else."""
    from rich.console import Console

    from .store.resolve import resolve_model
    from .quant.calibration import read_text_file
    from .quant.convert import quantize_checkpoint
    from .quant.quality import evaluate as evaluate_quality, table

    console = Console(stderr=True)
    try:
        if calibration_tokens < 2 or sequence_length < 2:
            raise MimoError("--calibration-tokens and --sequence-length must be >= 2")
        text = read_text_file(calibration) if calibration else None
        source = resolve_model(source, assume_yes=yes)
        result = quantize_checkpoint(source, recipe, out, calibration_text=text, calibration_tokens=calibration_tokens,
                                     sequence_length=sequence_length, show_progress=sys.stderr.isatty())
        line = f"wrote {out}: {result.shards_written} shards"
        if result.shards_skipped:
            line += f", {result.shards_skipped} already done"
        line += f" in {result.seconds:.1f} s"
        if result.rtn_fallbacks:
            line += f"; {len(result.rtn_fallbacks)} rarely routed weights fell back to round-to-nearest"
        if result.kept_mxfp4:
            line += f"; {result.kept_mxfp4} MXFP4 expert weights kept as stored"
        console.print(line)
        if evaluate:
            console.print(table([evaluate_quality(out, source, tokens=eval_tokens)]))
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: rerun the same command to resume", err=True)
        raise typer.Exit(130)
    except (MimoError, OSError, RuntimeError, ValueError) as error:
        _fail(error, debug)


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="Model (a quantized output, or a float one with --quant): directory or name."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Unquantized reference, directory or name (default: the source recorded "
                                       "by `mimo quantize`, or MODEL itself with --quant)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Quantize MODEL in memory with this recipe first."),
    tokens: int = typer.Option(1024, "--tokens", help="Tokens of the eval text to score."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    debug: bool = debug_option(),
):
    """Quality of a quantized model: mean/p99 KL divergence, top-1 agreement, perplexity of both."""

    from .store.resolve import resolve_model
    from .quant.quality import evaluate as evaluate_quality, table

    try:
        model_dir = resolve_model(model)
        report = evaluate_quality(model_dir, resolve_model(ref) if ref else None, quant=quant, tokens=tokens)
    except (MimoError, OSError, RuntimeError, ValueError) as error:
        _fail(error, debug)
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
    else:
        _console().print(table([report]))


def _plan_source(model: str) -> Path:
    """A directory or config.json as given, else a store name whose config.json is already here."""
    if Path(model).exists():
        return Path(model)
    from .store.names import parse_name

    ref = parse_name(model)
    if (ref.path / "config.json").is_file():
        return ref.path
    raise MimoError(f"{model}: not a directory, a config.json or a downloaded model (the plan needs its config.json)")


@app.command()
def plan(
    model: str = typer.Argument(..., help="Model directory, its config.json alone, or a downloaded model's name."),
    gpu_mem: Optional[str] = offload_options.gpu_mem_option(),
    cpu_mem: Optional[str] = offload_options.cpu_mem_option(),
    ctx: int = typer.Option(32768, "--ctx", help="Context length the KV cache is sized for (tokens)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Quantization recipe (name or YAML file)."),
    mtp: Optional[bool] = typer.Option(None, "--mtp/--no-mtp", help="Count the MTP layers (default: when the model has them)."),
    dtype: str = typer.Option("bfloat16", help="Dtype of the weights not quantized and of the KV cache."),
    cpu_moe: bool = offload_options.cpu_moe_option(),
    n_cpu_moe: int = offload_options.n_cpu_moe_option(),
    override_tensor: list[str] = offload_options.override_tensor_option(),
    parallel: int = typer.Option(1, "--parallel", help="KV caches of --ctx positions each (`mimo serve --parallel`)."),
    cache_type: str = cache_type_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as one JSON object."),
    debug: bool = debug_option(),
):
    """Where every weight, the KV cache and the activations go, per device and component, and
    whether it fits (exit code 1 when it does not). Needs config.json only, never the weights."""

    from .loader import resolve_dtype
    from .offload.plan import make_plan
    from .offload.report import render

    try:
        request = offload_options.placement_request(
            gpu_mem, cpu_mem, cpu_moe, n_cpu_moe, override_tensor, ctx=ctx, quant=quant, mtp=mtp,
            dtype=resolve_dtype(dtype, None), sequences=parallel, cache_type=cache_type,
        )
        result = make_plan(_plan_source(model), offload_options.with_budgets(request))
    except (MimoError, OSError) as error:
        _fail(error, debug)
    if as_json:
        typer.echo(json.dumps(result.to_json()))
    else:
        render(result, _console())
    raise typer.Exit(0 if result.fits else 1)


def _console():
    from rich.console import Console

    # Piped (a file, grep, less): as wide as the rows are, never cut at 80 columns.
    return Console(width=None if sys.stdout.isatty() else 1000)


@app.command("profile-experts")
def profile_experts(
    model: str = typer.Argument(..., help="Model directory or name (a MoE model: MiMo-V2-Flash)."),
    text: Path = typer.Option(..., "--text", help="Text file to run the model over."),
    window: int = typer.Option(2048, "--window", help="Tokens per context window."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    debug: bool = debug_option(),
):
    """Record how often the router picks each expert over TEXT into expert_stats.json beside the
    model (replacing what was there); placement puts the most picked experts on the GPU first."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from .engine import Engine
    from .offload.hotness import profile, save_stats, summary_rows

    try:
        if window < 1:
            raise MimoError("--window must be at least 1")
        try:
            content = text.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise MimoError(f"{text}: cannot read ({getattr(error, 'strerror', None) or error})") from None
        model_dir = _resolve_model_for_run(model, False)
        engine = Engine.load(model_dir, device=device, dtype=dtype, show_progress=sys.stderr.isatty())
        ids = engine.tokenizer.encode(content)
        bar = Progress(TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                       transient=True, disable=not sys.stderr.isatty())
        with bar:
            task = bar.add_task("profile", total=len(ids))
            stats = profile(engine.model, ids, window, on_progress=lambda n: bar.advance(task, n))
        path = save_stats(model_dir, stats)
    except (MimoError, OSError, RuntimeError, ValueError) as error:
        _fail(error, debug)
    table = Table(title=f"router statistics: {len(ids):,} tokens", title_justify="left")
    for column in ("layer", "tokens", "hottest experts (share)", "never chosen", "hottest 10% take"):
        table.add_column(column, justify="left" if column.startswith("hottest e") else "right")
    for row in summary_rows(stats):
        table.add_row(*row)
    _console().print(table)
    typer.echo(f"wrote {path}")


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to serve (as for `mimo run`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (another than loopback needs --api-key)."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MIMO_API_KEY",
                                          help="Require `Authorization: Bearer KEY` on every request."),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context size in tokens (default: the model's, at most 32768)."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests that may wait for the model; more get 503."),
    parallel: Optional[int] = typer.Option(None, "--parallel", "-np", help="Requests decoded together (continuous "
                                           "batching); each has a KV cache of --ctx tokens. Default: 4, or 2 or 1 "
                                           "where the memory plan fits no more."),
    cache_ram: str = typer.Option(DEFAULT_CACHE_RAM, "--cache-ram", help="Host memory for the KV prefixes of earlier requests "
                                  "(a later request sharing a prefix prefills only the rest); 0 disables."),
    max_body: str = typer.Option("4MiB", "--max-body", help="Largest request body (bigger: 413)."),
    reasoning_format: str = typer.Option("auto", "--reasoning-format",
                                         help="auto: <think> blocks go to reasoning_content; none: raw tags in content."),
    log_prompts: bool = typer.Option(False, "--log-prompts", help="Log prompts and answers (never logged otherwise)."),
    idle_timeout: Optional[str] = typer.Option(None, "--idle-timeout", help="Exit after this long without requests "
                                               "(e.g. 5m; default: never). `mimo run --keep-alive` starts servers so."),
    max_tokens: int = typer.Option(4096, "--max-tokens", "-n", help="Default most tokens per answer (requests set theirs)."),
    temperature: float = temperature_option(),
    top_p: float = top_p_option(),
    top_k: int = top_k_option(),
    min_p: float = min_p_option(),
    repetition_penalty: float = repetition_penalty_option(),
    mtp: Optional[bool] = mtp_option(),
    draft_tokens: int = draft_tokens_option(),
    device: str = device_option(),
    dtype: str = dtype_option(),
    quant: Optional[str] = quant_option(),
    mmap: bool = mmap_option(),
    mlock: bool = mlock_option(),
    gpu_mem: Optional[str] = offload_options.gpu_mem_option(),
    cpu_mem: Optional[str] = offload_options.cpu_mem_option(),
    cpu_moe: bool = offload_options.cpu_moe_option(),
    n_cpu_moe: int = offload_options.n_cpu_moe_option(),
    override_tensor: list[str] = offload_options.override_tensor_option(),
    cache_type: str = cache_type_option(),
    yes: bool = yes_option(),
    debug: bool = debug_option(),
):
    """Serve the model over HTTP: the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) and
    Ollama's (/api/chat, /api/generate, /api/tags, ...), plus /health and /metrics."""
    from .serve.launch import ServeOptions, auto_parallel, serve as serve_model
    from .sampling import SamplingSettings

    with FrontEnd(debug):
        if reasoning_format not in ("auto", "none"):
            raise MimoError("--reasoning-format must be auto or none")
        idle_seconds = parse_duration(idle_timeout, "--idle-timeout") if idle_timeout else None
        if max_queue < 0 or draft_tokens < 0 or not 0 < port < 65536 or not 1 <= (parallel or 1) <= 64:
            raise MimoError("--max-queue and --draft-tokens must be >= 0, --parallel in 1..64, --port in 1..65535")
        defaults = SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                    repetition_penalty=repetition_penalty, max_tokens=max_tokens).validate()
        model_dir = _resolve_model_for_run(model, yes)
        placement = offload_options.placement_request(gpu_mem, cpu_mem, cpu_moe, n_cpu_moe, override_tensor,
                                                      ctx=ctx or 32768, mtp=mtp, clamp_ctx=True, sequences=parallel or 1,
                                                      cache_type=cache_type)
        if parallel is None:
            parallel = auto_parallel(model_dir, placement, device, dtype, quant)
            placement = dataclasses.replace(placement, sequences=parallel)
        options = ServeOptions(model or model_dir.name, model_dir, host=host, port=port, api_key=api_key, context=ctx,
                               max_queue=max_queue, parallel=parallel, cache_ram=parse_size(cache_ram, "--cache-ram"),
                               max_body_bytes=parse_size(max_body, "--max-body"),
                               reasoning_format=reasoning_format, log_prompts=log_prompts, defaults=defaults, mtp=mtp,
                               draft_tokens=draft_tokens, device=device, dtype=dtype, quant=quant, placement=placement,
                               mmap=mmap, mlock=mlock,
                               idle_timeout=idle_seconds)
        code = serve_model(options, on_message=lambda line: typer.echo(line, err=True))
    if code:
        raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
