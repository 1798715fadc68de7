"""JSON files written atomically: a temporary file beside the target, then a rename, so a reader (or a
rerun after a crash or a full disk) sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)  # e.g. a full disk: leave no half-written temp file behind
        raise
