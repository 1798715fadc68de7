"""File names that come from the network (a hub's file list): which are safe to write under a model directory.

A hub, a mirror or anything in between behind `HF_ENDPOINT` can send any string as a file name, and
the sha256 it sends comes from the same place, so verification cannot catch a hostile name. A name
is accepted only when it can only ever mean a file inside the model directory, on every platform
and after any decoding a tool might apply: relative, `/`-separated, normalised, no `.`/`..`/empty
components, no backslash, drive letter, control or invisible formatting character, and the same
holds for its percent-decoded and NFKC-normalised forms (fullwidth `．．／` become `../`).
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

MAX_NAME_CHARS = 1024
MAX_COMPONENT_BYTES = 240  # room for the ".part" suffix under the usual 255-byte limit
_UNPRINTABLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
_DRIVE = re.compile(r"^[A-Za-z]:")


def unsafe_reason(name: object, reserved: tuple[str, ...] = ()) -> str | None:
    """Why `name` must not be written under a model directory, or None when it is safe.

    `reserved` lists first components that belong to us (e.g. the `.mimo` state directory),
    compared case-insensitively for case-insensitive file systems.
    """
    if not isinstance(name, str):
        return f"not a string ({type(name).__name__})"
    if len(name) > MAX_NAME_CHARS:
        return f"longer than {MAX_NAME_CHARS} characters"
    for form in _forms(name):
        if reason := _structural_problem(form):
            return reason if form == name else f"{reason} once decoded ({form!r})"
    first = name.split("/", 1)[0].casefold()
    if first in {r.casefold() for r in reserved}:
        return f"inside {first}/, which is reserved for mimo's own state"
    return None


def _forms(name: str) -> list[str]:
    """The name and what a tool might turn it into: percent-decoding (repeated) and NFKC normalisation."""
    forms = [name]
    decoded = name
    for _ in range(4):  # %252e%252e needs two rounds; more is no real file name
        decoded = unquote(decoded, errors="replace") if "%" in decoded else decoded
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    forms += [unicodedata.normalize("NFKC", form) for form in list(forms)]
    return list(dict.fromkeys(forms))


def _structural_problem(name: str) -> str | None:
    if not name:
        return "empty"
    for char in name:
        if unicodedata.category(char) in _UNPRINTABLE:
            return f"a control or invisible character (U+{ord(char):04X})"
    if "\\" in name:
        return "a backslash"
    if name.startswith("/"):
        return "an absolute path"
    for component in name.split("/"):
        if component == "":
            return "an empty path component (// or a trailing /)"
        if component in (".", ".."):
            return f"a '{component}' component"
        if component.strip(". ") == "":
            return "a component of only dots and spaces (Windows reads it as '..')"
        if _DRIVE.match(component):
            return "a drive letter"
        if len(component.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            return f"a component longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def conflicting_names(names: list[str]) -> tuple[str, str] | None:
    """Two names that cannot both be files: the same name twice, or a file that is also a directory."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name, name
        seen.add(name)
    for name in names:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            if prefix in seen:
                return prefix, name
    return None
