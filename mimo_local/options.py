"""The flags the front ends share (run, chat, bench, serve), declared once: their names, help and
defaults. Sampling defaults come from SamplingSettings (MiMo's model-card values), the placement
flags from offload/options.py."""

from __future__ import annotations

import typer

from .sampling_settings import SamplingSettings

SAMPLING_DEFAULTS = SamplingSettings()


def debug_option():
    return typer.Option(False, "--debug", help="Show tracebacks.")


def yes_option():
    return typer.Option(False, "--yes", "-y", help="Pull a missing hub model without asking.")


def device_option():
    return typer.Option("auto", help="auto | cpu | cuda")


def dtype_option():
    return typer.Option("auto", help="auto | float32 | bfloat16 | float16")


def temperature_option():
    return typer.Option(SAMPLING_DEFAULTS.temperature, help="0 = greedy (exact argmax).")


def top_p_option():
    return typer.Option(SAMPLING_DEFAULTS.top_p, "--top-p")


def top_k_option():
    return typer.Option(SAMPLING_DEFAULTS.top_k, "--top-k", help="0 = off.")


def min_p_option():
    return typer.Option(SAMPLING_DEFAULTS.min_p, "--min-p")


def repetition_penalty_option():
    return typer.Option(SAMPLING_DEFAULTS.repetition_penalty, "--repetition-penalty")


def seed_option():
    return typer.Option(None, help="Random seed for sampling.")


def draft_tokens_option():
    return typer.Option(0, "--draft-tokens", help="Most tokens drafted per step (default: one per MTP layer); a step drafts one more than "
                        "the last step kept.")


def mtp_option():
    return typer.Option(
        None, "--mtp/--no-mtp", help="Speculative decoding with the MTP layers (default: on when the checkpoint has them)."
    )


def server_option():
    return typer.Option(None, "--server", envvar="MIMO_SERVER", help="URL of a running `mimo serve`: it generates with "
                        "the model it has loaded (the model, placement and MTP flags are the server's).")


def api_key_option():
    return typer.Option(None, "--api-key", envvar="MIMO_API_KEY", help="Key for --server.")


def keep_alive_option():
    return typer.Option(None, "--keep-alive", envvar="MIMO_KEEP_ALIVE", help="Keep the model loaded in a background "
                        "server for this long after its last use (e.g. 5m, 1h; 0: no): later calls with the same "
                        "model and load flags answer without loading it. `mimo ps` lists them, `mimo stop` ends them.")


def mmap_option():
    return typer.Option(True, "--mmap/--no-mmap", help="Map the weights from the model's files instead of copying them "
                        "(CPU only; converted weights are cached once in the model's .mimo-runtime folder): fast "
                        "starts, one copy in RAM for every process. --no-mmap copies them into memory.")


def mlock_option():
    return typer.Option(False, "--mlock", help="Keep the weights in RAM: never paged out, even under memory pressure "
                        "(needs `ulimit -l` to allow it).")


def quant_option():
    return typer.Option(None, "--quant", help="Quantize while loading with this recipe (name or YAML file; no file "
                        "is written).")


def cache_type_option():
    return typer.Option("bf16", "--cache-type", help="KV cache of the global-attention layers: bf16 (the model's dtype) "
                        "or int8 (about half the bytes; a scale per head and position). Sliding-window layers keep "
                        "the model's dtype.")
