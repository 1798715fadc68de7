"""Memory sizes as people type them: `24G`, `24GB`, `24gb`, `24GiB`, `1.5T`, `1500MiB`, `512M`;
and durations: `30s`, `5m`, `1h`.

Every unit is a power of 1024, with or without `B` or `iB` and in any case: `24G` = `24GB` =
`24GiB` = 24 x 2^30 bytes, as Docker's `--memory 24g` and `free -g` read it, and as a "24 GB"
GPU or RAM stick is sold. `B` is always bytes, never bits. A bare number has no unit and is
refused (`24` would be 24 bytes), except `0`, which means no memory at all (`--gpu-mem 0`)."""

from __future__ import annotations

import re

from .errors import MimoError

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
SIZE = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[KMGTP]?)(?:I?B)?", re.IGNORECASE)
EXAMPLES = "like 24G, 24GiB, 1.5T or 512M; units are powers of 1024"


def parse_size(text: str, flag: str) -> int:
    """Bytes in `text`; MimoError (naming `flag`) for anything else."""
    stripped = text.strip()
    match = SIZE.fullmatch(stripped)
    if match is None or (stripped.upper().endswith("IB") and not match.group("unit")):
        raise MimoError(f"{flag} {text}: not a size ({EXAMPLES})")
    number, unit = float(match.group("number")), match.group("unit").upper()
    if number == 0:
        return 0
    if unit == "" and stripped[-1:] not in ("b", "B"):
        raise MimoError(f"{flag} {text}: a size needs a unit ({EXAMPLES}; 0 for none)")
    return int(number * UNITS[unit])



DURATION = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>ms|s|m|h)?", re.IGNORECASE)
SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str, flag: str) -> float:
    """Seconds in `text`, as ollama's keep_alive takes them: `30s`, `5m`, `1.5h`, `250ms`, or a bare
    number of seconds; MimoError (naming `flag`) for anything else."""
    match = DURATION.fullmatch(text.strip())
    if match is None:
        raise MimoError(f"{flag} {text}: not a duration (like 30s, 5m or 1h; a bare number is seconds)")
    return float(match.group("number")) * SECONDS[(match.group("unit") or "s").lower()]
