"""How much of a cold start's weights the disk has read by the time Python has imported torch and the engine,
with and without early_read.py asking for them first (a fresh interpreter per round, files evicted first).

    python benchmarks/bench_early_read.py --model /work/big/mimo-7b-full [--quant int4-g128] [--rounds 2]

Runs `mimo run -n 1` once to make the load's record of mapped ranges (the model's other records are
removed first), then alternates rounds
without and with the early read. Prints one line per round.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_start import evict  # noqa: E402

from mimo_local import early_read  # noqa: E402

# argv: record file, with|without. Prints the imports' seconds and the recorded bytes resident after them.
ROUND = r"""
import ctypes, json, mmap, sys, time
from pathlib import Path
started = time.perf_counter()
from mimo_local import early_read
spans = {Path(name): entry["spans"] for name, entry in json.loads(Path(sys.argv[1]).read_text()).items()}
if sys.argv[2] == "with":
    early_read.read_in_background(spans)
import torch
from mimo_local.engine import Engine
imports = time.perf_counter() - started
libc, page, resident = ctypes.CDLL(None, use_errno=True), mmap.PAGESIZE, 0
for path, ranges in spans.items():
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    base = torch.frombuffer(mapped, dtype=torch.uint8).data_ptr()
    for begin, end in ranges:
        pages = -(-(end - begin) // page)
        vector = (ctypes.c_ubyte * pages)()
        libc.mincore(ctypes.c_void_p(base + begin), ctypes.c_size_t(end - begin), vector)
        resident += sum(flag & 1 for flag in vector) * page
print(imports, resident)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--quant", default=None)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    mimo = str(Path(sys.executable).with_name("mimo"))
    for stale in early_read.runtime_folder(args.model).glob("read-spans-*.json"):
        stale.unlink()  # only hints: the run below writes this load's again
    subprocess.run([mimo, "run", "-m", str(args.model), "-n", "1", "--raw", "--no-mtp",
                    *(["--quant", args.quant] if args.quant else []), "hi"], capture_output=True, check=True)
    (record,) = early_read.runtime_folder(args.model).glob("read-spans-*.json")
    spans = json.loads(record.read_text())
    total = sum(end - begin for entry in spans.values() for begin, end in entry["spans"])
    for _ in range(args.rounds):
        for mode in ("without", "with"):
            evict([Path(name) for name in spans])
            out = subprocess.run([sys.executable, "-c", ROUND, str(record), mode],
                                 capture_output=True, text=True, check=True).stdout.split()
            print(f"{mode:7s} early read: imports {float(out[0]):.2f} s, then {int(out[1]) / 2**30:.2f} of "
                  f"{total / 2**30:.2f} GiB resident", flush=True)


if __name__ == "__main__":
    main()
