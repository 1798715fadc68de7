"""Recipes: ordered `regex -> scheme` rules over hub tensor names, first match wins (like llama.cpp
mixes). Only linear projections (attention, FFN, experts, MTP input projections, and lm_head when it
is not tied to the embeddings) can be quantized; embeddings, routers, norms, biases and sinks always
stay in high precision."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

import yaml

from ..errors import MimoError

SCHEMES = ("keep", "int8", "int4", "gptq", "nf4", "bnb-int8")
FILE_FORMAT = {"int8": "gptq", "int4": "gptq", "gptq": "gptq", "nf4": "bitsandbytes", "bnb-int8": "bitsandbytes"}


@dataclass(frozen=True)
class Scheme:
    name: str = "keep"
    bits: int = 16
    group_size: int = -1  # -1: one group spanning all inputs (per output channel)
    sym: bool = True
    act_order: bool = False  # gptq: quantize columns by decreasing Hessian diagonal
    damp: float = 0.01  # gptq: fraction of the mean Hessian diagonal added to it
    min_tokens: int = 64  # gptq: fewer calibration tokens (rare experts) -> round-to-nearest
    blocksize: int = 64  # nf4: inputs per absmax block

    @property
    def quantized(self) -> bool:
        return self.name != "keep"

    @property
    def calibrated(self) -> bool:
        return self.name == "gptq"

    @property
    def file_format(self) -> str | None:
        return FILE_FORMAT.get(self.name)

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    @property
    def runtime_kind(self) -> str | None:
        """The QuantLinear layout it loads into: int8 (int8, 8-bit GPTQ, bnb-int8), int4 or nf4."""
        if not self.quantized:
            return None
        return "nf4" if self.name == "nf4" else "int8" if self.bits == 8 else "int4"

    def fit(self, tensor: str, shape: tuple) -> "Scheme":
        """This scheme adapted to a weight's shape: inputs that are not a multiple of the group (or
        nf4 block) take the largest power of two that divides them, down to MIN_GROUP, then one
        group per row (int4); a shape no layout can hold stays unquantized (KEEP), or is a one-line
        error where keeping it would split a fused projection (outputs GPTQ cannot pack)."""
        if not self.quantized:
            return self
        out_features, in_features = shape[-2], shape[-1]
        if self.file_format == "gptq":
            if out_features % 8:
                raise MimoError(f"'{tensor}': GPTQ packing needs out features divisible by 8, got {list(shape)}")
            if in_features % 8:
                return KEEP  # inputs are shared by every fused part: they all stay unquantized
            if self.bits == 4 and self.group_size != -1 and in_features % self.group_size:
                group = largest_group(in_features, self.group_size)
                return replace(self, group_size=group or -1)
            return self
        if self.name == "nf4" and in_features % self.blocksize:
            block = largest_group(in_features, self.blocksize)
            return replace(self, blocksize=block) if block else KEEP
        return self


MIN_GROUP = 32  # smaller groups cost more in scales than they win in accuracy; bitsandbytes' smallest block


def largest_group(in_features: int, limit: int) -> int | None:
    """The largest power of two <= `limit` that divides `in_features`, if at least MIN_GROUP."""
    group = 1 << (min(in_features & -in_features, limit).bit_length() - 1)
    return group if group >= MIN_GROUP else None


KEEP = Scheme()
DEFAULT_BITS = {"keep": 16, "int8": 8, "int4": 4, "gptq": 4, "nf4": 4, "bnb-int8": 8}
DEFAULT_GROUP = {"int4": 128, "gptq": 128}


def make_scheme(options: dict, where: str) -> Scheme:
    options = dict(options)
    name = options.pop("scheme", None)
    if name not in SCHEMES:
        raise MimoError(f"{where}: unknown scheme '{name}' (choose from {', '.join(SCHEMES)})")
    known = {f.name for f in fields(Scheme)} - {"name"}
    unknown = set(options) - known
    if unknown:
        raise MimoError(f"{where}: unknown option '{sorted(unknown)[0]}' (known: {', '.join(sorted(known))})")
    options.setdefault("bits", DEFAULT_BITS[name])
    options.setdefault("group_size", DEFAULT_GROUP.get(name, -1))
    scheme = Scheme(name=name, **options)
    if name == "gptq" and scheme.bits not in (4, 8):
        raise MimoError(f"{where}: gptq bits must be 4 or 8, got {scheme.bits}")
    if name != "gptq" and scheme.bits != DEFAULT_BITS[name]:
        raise MimoError(f"{where}: scheme '{name}' has {DEFAULT_BITS[name]} bits, not {scheme.bits}")
    if name in ("int8", "bnb-int8") and scheme.group_size != -1:
        raise MimoError(f"{where}: '{name}' is per output channel (group_size -1)")
    if scheme.group_size != -1 and scheme.group_size <= 0:
        raise MimoError(f"{where}: group_size must be positive or -1")
    return scheme


@dataclass(frozen=True)
class Rule:
    pattern: str
    scheme: Scheme
    regex: re.Pattern = field(compare=False, repr=False)
    optional: bool = False  # may match nothing (lm_head rules: tied checkpoints have no lm_head)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    rules: tuple[Rule, ...]
    text: str  # the YAML as read: part of the output fingerprint

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def calibrated(self) -> bool:
        return any(rule.scheme.calibrated for rule in self.rules)

    def scheme_for(self, tensor: str) -> Scheme:
        for rule in self.rules:
            if rule.regex.search(tensor):
                return rule.scheme
        return KEEP

    def plan(self, shapes: dict[str, tuple], quantizable: set[str]) -> dict[str, Scheme]:
        """The scheme of every quantizable tensor that gets one, fitted to its shape (Scheme.fit:
        smaller groups where the inputs are not a multiple of the group); errors (before any work)
        for a rule matching no tensor, shapes no layout can hold, or formats that cannot share one
        checkpoint."""
        for rule in self.rules:
            if not rule.optional and not any(rule.regex.search(name) for name in shapes):
                raise MimoError(f"recipe '{self.name}': rule '{rule.pattern}' matches no tensor of this checkpoint")
        plan = {}
        for name in quantizable:
            scheme = self.scheme_for(name)
            scheme = scheme.fit(name, shapes[name])
            if scheme.quantized:
                plan[name] = scheme
        formats = {s.file_format for s in plan.values()}
        if len(formats) > 1:
            raise MimoError(f"recipe '{self.name}' mixes GPTQ-layout and bitsandbytes schemes: no loader reads both")
        if len({s.name for s in plan.values() if s.file_format == "bitsandbytes"}) > 1:
            raise MimoError(f"recipe '{self.name}' mixes nf4 and bnb-int8: transformers reads one per checkpoint")
        return plan


def shipped_recipes() -> dict[str, Path]:
    folder = resources.files("mimo_local.quant_recipes")
    return {Path(item.name).stem: Path(str(item)) for item in folder.iterdir() if item.name.endswith(".yaml")}


def load_recipe(name_or_file: str | Path) -> Recipe:
    """A shipped recipe by name, or a YAML file."""
    shipped = shipped_recipes()
    if str(name_or_file) in shipped:
        path = shipped[str(name_or_file)]
    else:
        path = Path(name_or_file)
        if not path.is_file():
            raise MimoError(f"unknown recipe '{name_or_file}' (shipped: {', '.join(sorted(shipped))}; or a YAML file)")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise MimoError(f"{path.name}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list) or not data["rules"]:
        raise MimoError(f"{path.name}: a recipe needs a non-empty 'rules' list")
    rules = []
    for number, item in enumerate(data["rules"], start=1):
        where = f"{path.name} rule {number}"
        if not isinstance(item, dict) or "match" not in item:
            raise MimoError(f"{where}: needs 'match' (a regex) and 'scheme'")
        options = {k: v for k, v in item.items() if k not in ("match", "optional")}
        try:
            regex = re.compile(str(item["match"]))
        except re.error as error:
            raise MimoError(f"{where}: bad regex '{item['match']}' ({error})") from None
        rules.append(Rule(str(item["match"]), make_scheme(options, where), regex, bool(item.get("optional", False))))
    return Recipe(str(data.get("name", path.stem)), str(data.get("description", "")), tuple(rules), text)
