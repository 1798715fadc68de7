"""One declaration of each C entry point: the ctypes table its binding is set from (`declare`), checked
against the prototype the compiler sees (`mismatches`, from gcc's -aux-info), so that a parameter
list changed on one side only fails the tests instead of crashing a process."""

from __future__ import annotations

import ctypes
import re
import subprocess
import tempfile
from pathlib import Path

from . import build

Declaration = tuple[list, object]  # (argtypes, restype)

_CTYPE_KINDS = {ctypes.c_void_p: "pointer", ctypes.c_char_p: "pointer", ctypes.c_int: "int", ctypes.c_int64: "int64",
                ctypes.c_float: "float", ctypes.c_double: "double", None: "void"}
# "/* file:line:NF */ extern void f (const float *x, int n); /* ... */" (NC: a prototype without names)
_PROTOTYPE = re.compile(r"^/\* (?P<file>.+?):\d+:N[CF] \*/ extern (?P<result>.+?)\b(?P<name>\w+) \((?P<params>[^)]*)\);")


def declare(library: ctypes.CDLL, declarations: dict[str, Declaration]) -> None:
    for name, (argtypes, restype) in declarations.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, restype


def c_kind(declaration: str) -> str:
    """The ABI class of a C type as ctypes needs it: pointer, int, int64, float, double or void."""
    if "*" in declaration:
        return "pointer"
    words = set(declaration.replace("const", " ").split())
    for kind, names in (("float", {"float"}), ("double", {"double"}), ("int64", {"long", "int64_t"}),
                        ("int", {"int", "int32_t"}), ("void", {"void"})):
        if words & names:
            return kind
    return declaration.strip()


def prototypes(source: Path, flags: list[str]) -> dict[str, tuple[list[str], str]]:
    """name -> (parameter kinds, result kind) of every non-static function `source` (or a file it
    includes with `#include "file"`) defines."""
    with tempfile.TemporaryDirectory() as folder:
        listing = Path(folder) / "prototypes"
        subprocess.run([build.compiler(), *flags, "-fsyntax-only", "-aux-info", str(listing), str(source)],
                       check=True, capture_output=True)
        lines = listing.read_text().splitlines()
    found = {}
    own_files = {path.name for path in build.sources(source)}
    for line in lines:
        match = _PROTOTYPE.match(line)
        if match and Path(match["file"]).name in own_files:
            params = [] if match["params"] in ("", "void") else match["params"].split(", ")
            found[match["name"]] = ([c_kind(p) for p in params], c_kind(match["result"]))
    return found


def mismatches(declarations: dict[str, Declaration], source: Path, flags: list[str]) -> list[str]:
    """How the declarations disagree with the source's prototypes (empty when they agree)."""
    compiled = prototypes(source, flags)
    problems = []
    for name, (argtypes, restype) in declarations.items():
        declared = ([_CTYPE_KINDS[t] for t in argtypes], _CTYPE_KINDS[restype])
        if name not in compiled:
            problems.append(f"{name}: declared, not defined in {source.name}")
        elif compiled[name] != declared:
            problems.append(f"{name}: {source.name} has {compiled[name]}, the bindings declare {declared}")
    return problems
