"""What a checkpoint already holds quantized, as a scheme per hub weight (the answer a recipe's
`plan` gives for a float checkpoint), so that the memory planner counts the bytes the loader will
really allocate.

With the weights at hand the safetensors headers say it per tensor: GPTQ `qweight` / `scales`
shapes give the bits and the group size, a bitsandbytes quant state its block, `SCB` LLM.int8,
uint8 bytes beside a `weight_scale` MXFP4 (experts `mimo quantize` kept as stored).
From config.json alone (`mimo plan` on a bare config) `quantization_config` says it: GPTQ bits,
group_size, desc_act, `lm_head` and GPTQModel's `dynamic` per-module overrides ('+:regex' /
'-:regex', first match wins), or bitsandbytes load_in_4bit / load_in_8bit with
llm_int8_skip_modules. FP8 weights are not kept as such: the loader dequantizes them to the
model dtype, so they plan as float weights."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import MimoError
from . import mxfp4
from .recipes import KEEP, Scheme

NOT_KEPT = (None, "fp8")  # quant methods the loader turns into float weights


def stored_method(raw_config: dict) -> str | None:
    """'gptq' or 'bitsandbytes' for a checkpoint stored quantized (None for float or FP8)."""
    quant = raw_config.get("quantization_config") or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return None if method in NOT_KEPT else str(method)


def describe(raw_config: dict) -> str | None:
    """A few words on the stored quantization, e.g. 'gptq 4-bit g128 (+ per-module overrides)'."""
    quant = raw_config.get("quantization_config") or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method is None:
        return None
    if method == "fp8":
        return "fp8 (dequantized on load)"
    if method == "gptq":
        group = quant.get("group_size", -1)
        text = f"gptq {quant.get('bits', 4)}-bit " + ("per channel" if group == -1 else f"g{group}")
        return text + (" + per-module overrides" if quant.get("dynamic") else "")
    if method == "bitsandbytes":
        return "bitsandbytes nf4" if quant.get("load_in_4bit") else "bitsandbytes int8"
    return str(method)


@dataclass
class StoredQuantization:
    """Answers `plan(shapes, quantizable)` as a Recipe does, for what a checkpoint holds."""

    raw_config: dict
    entries: dict | None = None  # hub tensor name -> checkpoint entry (with .shape), when weights exist
    source: str = "config.json"

    @property
    def name(self) -> str:
        return describe(self.raw_config) or "none"

    def plan(self, shapes: dict[str, tuple], quantizable: set[str]) -> dict[str, Scheme]:
        method = stored_method(self.raw_config)
        if method is None:
            return {}
        if method not in ("gptq", "bitsandbytes"):
            raise MimoError(f"{self.source}: quant_method '{method}' is not supported (gptq, bitsandbytes, fp8)")
        read = self._from_tensors if self.entries is not None else self._from_config
        plan = {}
        try:
            for name in quantizable:
                scheme = read(name, shapes[name])
                if scheme.quantized:
                    plan[name] = scheme
        except (TypeError, ValueError, AttributeError) as error:  # a value of the wrong type or range
            raise MimoError(f"{self.source}: unreadable quantization_config ({error})") from None
        return plan

    # -- from the tensors --------------------------------------------------------------------------

    def _from_tensors(self, name: str, shape: tuple) -> Scheme:
        base, entries = name[: -len(".weight")], self.entries
        out_features, in_features = shape[-2], shape[-1]
        if base + ".qweight" in entries:
            bits = 32 * entries[base + ".qweight"].shape[0] // in_features
            groups = entries[base + ".scales"].shape[0] if base + ".scales" in entries else 1
            act_order = bool((self._gptq_settings(base) or {}).get("desc_act", False))
            return Scheme("gptq", bits=bits, group_size=-1 if groups == 1 else in_features // groups,
                          act_order=act_order)
        if base + ".weight.quant_state.bitsandbytes__nf4" in entries:
            blocks = math.prod(entries[base + ".weight.absmax"].shape)
            return Scheme("nf4", bits=4, blocksize=out_features * in_features // max(blocks, 1))
        if base + ".SCB" in entries:
            return Scheme("bnb-int8", bits=8)
        if mxfp4.is_mxfp4(entries[name].dtype, base + ".weight_scale" in entries):  # kept by `mimo quantize`
            return Scheme("mxfp4", bits=4, blocksize=mxfp4.BLOCK)
        return KEEP

    # -- from quantization_config ------------------------------------------------------------------

    def _from_config(self, name: str, shape: tuple) -> Scheme:
        quant, base = self.raw_config["quantization_config"], name[: -len(".weight")]
        if quant["quant_method"] == "bitsandbytes":
            skipped = quant.get("llm_int8_skip_modules") or []
            if any(base == key or key + "." in base + "." for key in skipped):
                return KEEP
            scheme = Scheme("nf4", bits=4) if quant.get("load_in_4bit") else Scheme("bnb-int8", bits=8)
            return scheme.fit(name, shape)
        settings = self._gptq_settings(base)
        if settings is None:
            return KEEP
        scheme = Scheme("gptq", bits=int(settings.get("bits", 4)), group_size=int(settings.get("group_size", -1)),
                        sym=bool(settings.get("sym", True)), act_order=bool(settings.get("desc_act", False)))
        return scheme.fit(name, shape)

    def _gptq_settings(self, module: str) -> dict | None:
        """GPTQ settings of `module`: the config's, a matching `dynamic` override, or None (skipped)."""
        quant = self.raw_config["quantization_config"]
        for key, override in (quant.get("dynamic") or {}).items():
            negative = key.startswith("-:")
            pattern = key[2:] if key[:2] in ("+:", "-:") else key
            try:
                matched = re.match(pattern, module)
            except re.error as error:
                raise MimoError(f"{self.source}: bad 'dynamic' pattern '{key}' ({error})") from None
            if matched:
                return None if negative else {**quant, **(override or {})}
        if module == "lm_head" and not quant.get("lm_head", False):
            return None
        return quant

