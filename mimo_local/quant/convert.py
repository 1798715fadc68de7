"""`mimo quantize`: a bf16 or FP8 hub checkpoint -> a quantized checkpoint in a standard layout.

Routed experts stored as MXFP4 (MiMo-V2.6) are copied as they are, whatever the recipe: they are
4.25 bits a weight already, so int4 would re-round them for no space (and int8 double them) while
adding error; the recipe quantizes the rest (attention, dense FFNs, MTP, lm_head). The output then
holds GPTQ (or bitsandbytes) weights beside MXFP4 ones, each read as it is stored.

Streams unit by unit (the shell tensors one at a time, each decoder / MTP layer whole) and writes an
output shard, atomically, as soon as every tensor it holds is done, so memory stays near one source
layer plus the output shards in flight plus the calibration state. After each shard a progress file
records its sha256; a rerun skips finished shards (GPTQ replays their layers from the written output
to rebuild the calibration inputs). The manifest is written last: an output without it is incomplete.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import __version__, limits
from ..cache import make_layer_cache
from ..checkpoint import INDEX_FILE, Checkpoint, read_header, write_safetensors
from ..config import load_config, read_raw_config
from ..errors import MimoError
from ..models.layers import RotaryEmbedding, Router
from . import formats, manifest, mxfp4, runtime
from .calibration import calibration_ids
from .gptq import HessianAccumulator
from .loading import linear_targets
from .recipes import Recipe, Scheme, load_recipe

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                "vocab.json", "merges.txt", "chat_template.jinja")
NF4_SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                "weight.quant_state.bitsandbytes__nf4")
SUFFIXES = {"gptq": formats.GPTQ_SUFFIXES, "nf4": NF4_SUFFIXES, "bnb-int8": ("weight", "SCB", "weight_format")}


def output_suffixes(scheme: Scheme) -> tuple[str, ...]:
    return SUFFIXES["gptq" if scheme.file_format == "gptq" else scheme.name]


@dataclass
class Unit:
    """Tensors processed together: one decoder layer (`layer`), one MTP layer (`mtp`), or one tensor."""

    kind: str  # layer | mtp | tensor
    number: int
    tensors: list[str] = field(default_factory=list)


@dataclass
class QuantizeResult:
    out: Path
    shards_written: int
    shards_skipped: int
    seconds: float
    rtn_fallbacks: list[str]
    kept_mxfp4: int = 0  # MXFP4 weights copied as stored


def stored_mxfp4(checkpoint: Checkpoint) -> set[str]:
    """The weights the checkpoint holds as MXFP4 (uint8 bytes beside a `_scale`, quant/mxfp4.py)."""
    entries = checkpoint.entries
    return {name for name, entry in entries.items() if mxfp4.is_mxfp4(entry.dtype, name + "_scale" in entries)}


class Interrupted(Exception):
    """Raised by tests through `after_shard` to simulate Ctrl-C between shards."""


def quantize_checkpoint(
    source: str | Path,
    recipe: str | Path | Recipe,
    out: str | Path,
    calibration_text: str | None = None,
    calibration_tokens: int = 4096,
    sequence_length: int = 512,
    show_progress: bool = False,
    after_shard=None,
) -> QuantizeResult:
    started = time.perf_counter()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    with limits.reading(source):
        job = QuantizeJob(Path(source), recipe, Path(out))
    job.calibration = (calibration_text, calibration_tokens, sequence_length)
    return job.run(show_progress, after_shard, started)


def _is_temporary(path: Path) -> bool:
    """A file an interrupted atomic write of ours leaves behind (temp file + rename)."""
    return path.is_file() and path.name.endswith(".tmp")


class QuantizeJob:
    def __init__(self, source: Path, recipe: Recipe, out: Path):
        from ..loader import count_mtp_layers
        from ..models import build_meta_model, family_module

        if not source.is_dir():
            raise MimoError(f"model directory not found: {source}")
        if out.resolve() == source.resolve():
            raise MimoError("--out must differ from the source directory")
        self.source, self.recipe, self.out = source, recipe, out
        self.config = load_config(source)
        self.raw_config = read_raw_config(source)
        if (self.raw_config.get("quantization_config") or {}).get("quant_method") not in (None, "fp8"):
            raise MimoError(f"{source} is already quantized; quantize a bf16 or FP8 checkpoint")
        self.checkpoint = Checkpoint(source, self.config.fp8_block_size, self.config)
        self.kept_mxfp4 = sorted(stored_mxfp4(self.checkpoint))
        num_mtp = count_mtp_layers(self.config, self.checkpoint)
        self.config = dataclasses.replace(self.config, num_mtp_layers=num_mtp)
        self.model = build_meta_model(self.config, num_mtp, torch.float32)
        self.targets = family_module(self.config).weight_map(self.model).targets
        shapes = {n: e.shape for n, e in self.checkpoint.entries.items() if not n.endswith("_scale_inv")}
        self.plan = recipe.plan(shapes, set(linear_targets(self.model, self.targets)) - set(self.kept_mxfp4))
        if not self.plan:
            raise MimoError(f"recipe '{recipe.name}' quantizes no tensor of {source}")
        self.units = self._units()
        self.shard_of, self.shard_names = self._output_layout()
        self.fingerprint = None
        self.calibration = (None, 4096, 512)
        self.rtn_fallbacks: list[str] = []

    # ---- layout ---------------------------------------------------------------------------------
    def _units(self) -> list[Unit]:
        layers = {i: Unit("layer", i) for i in range(len(self.model.layers))}
        mtp = {k: Unit("mtp", k) for k in range(len(self.model.mtp_layers))}
        before, after = [], []
        for name in self.checkpoint.names():
            if name.endswith("_scale_inv"):
                continue
            target = self.targets.get(name)
            match = re.match(r"(layers|mtp_layers)\.(\d+)\.", target.param) if target else None
            if match:
                (layers if match.group(1) == "layers" else mtp)[int(match.group(2))].tensors.append(name)
            elif name.startswith("model.embed_tokens"):
                before.append(Unit("tensor", 0, [name]))
            else:
                after.append(Unit("tensor", 0, [name]))
        return before + list(layers.values()) + list(mtp.values()) + after

    def output_names(self, name: str) -> list[str]:
        scheme = self.plan.get(name)
        if scheme is None:
            return [name]
        base = name[: -len(".weight")]
        return [f"{base}.{suffix}" for suffix in output_suffixes(scheme)]

    def _output_layout(self):
        shard_of, names = {}, {}
        for name, entry in self.checkpoint.entries.items():
            if name.endswith("_scale_inv"):
                continue
            shard = entry.file.name
            for output in self.output_names(name):
                shard_of[output] = shard
                names.setdefault(shard, []).append(output)
        return shard_of, names

    # ---- output config --------------------------------------------------------------------------
    def quantization_config(self) -> dict:
        schemes = list(self.plan.values())
        if schemes[0].file_format == "bitsandbytes":
            kept = sorted({n[: -len(".weight")] for n in linear_targets(self.model, self.targets) if n not in self.plan})
            four = schemes[0].name == "nf4"
            return {
                "quant_method": "bitsandbytes",
                "load_in_4bit": four,
                "load_in_8bit": not four,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": "bfloat16",
                "bnb_4bit_quant_storage": "uint8",
                "llm_int8_threshold": 6.0,
                "llm_int8_has_fp16_weight": False,
                "llm_int8_skip_modules": sorted({"lm_head", *kept}),
            }

        def key(scheme: Scheme):
            return scheme.bits, scheme.group_size, scheme.sym, scheme.act_order

        counts: dict = {}
        for scheme in schemes:
            counts[key(scheme)] = counts.get(key(scheme), 0) + 1
        bits, group_size, sym, act_order = max(counts, key=counts.get)
        config = {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "bits": bits,
            "group_size": group_size,
            "sym": sym,
            "desc_act": act_order,
            "damp_percent": schemes[0].damp,
            "true_sequential": False,
            "static_groups": False,
            "pack_dtype": "int32",
            "lm_head": "lm_head.weight" in self.plan,  # GPTQModel / vLLM: lm_head quantized too
            "meta": {"quantizer": [f"mimo-local:{__version__}"]},
        }
        dynamic = self._dynamic_overrides((bits, group_size, sym, act_order), key)
        if dynamic:
            config["dynamic"] = dynamic
        return config

    def _dynamic_overrides(self, default: tuple, key) -> dict:
        """GPTQModel / vLLM `dynamic`: per-module overrides ('+:regex') and skipped modules ('-:regex'),
        as module-name patterns with layer/expert numbers generalized where that stays unambiguous."""
        wanted = {}
        for name in linear_targets(self.model, self.targets):
            module = name[: -len(".weight")]
            wanted[module] = key(self.plan[name]) if name in self.plan else None
        by_pattern: dict[str, set] = {}
        for module, value in wanted.items():
            by_pattern.setdefault(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", "^" + re.escape(module) + "$"), set()).add(value)
        dynamic = {}
        for module, value in wanted.items():
            pattern = re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", "^" + re.escape(module) + "$")
            if len(by_pattern[pattern]) > 1:
                pattern = "^" + re.escape(module) + "$"
            if value is None:
                dynamic["-:" + pattern] = {}
            elif value != default:
                bits, group_size, sym, act_order = value
                dynamic["+:" + pattern] = {"bits": bits, "group_size": group_size, "sym": sym, "desc_act": act_order}
        return dynamic

    # ---- run ------------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        import hashlib

        text, tokens, length = self.calibration
        description = {
            "recipe": self.recipe.text,
            "source": {n: [str(e.dtype), list(e.shape), e.file.name] for n, e in self.checkpoint.entries.items()},
            "config": self.raw_config,
            "calibration": [hashlib.sha256((text or "").encode()).hexdigest(), tokens, length]
            if self.recipe.calibrated else None,
            "version": __version__,
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()

    def _start_output(self) -> dict:
        """The shards already finished by an earlier run of this same job (file -> sha256)."""
        out = self.out
        progress_path, manifest_path = out / manifest.PROGRESS, out / manifest.MANIFEST
        if out.exists() and not out.is_dir():
            raise MimoError(f"--out {out} exists and is not a directory")
        done = {}
        if progress_path.exists():
            state = self._read_progress(progress_path)
            if state["fingerprint"] != self.fingerprint:
                raise MimoError(f"{out} holds another quantization (other source, recipe or settings): choose another --out")
            shards = state.get("shards") if isinstance(state.get("shards"), dict) else {}
            for name, digest in shards.items():
                if name in self.shard_names and (out / name).is_file() and manifest.sha256_file(out / name) == digest:
                    done[name] = digest
        elif out.exists() and any(not _is_temporary(path) for path in out.iterdir()):
            raise MimoError(f"--out {out} is not empty and holds no interrupted quantization")
        if out.is_dir():  # a killed run's half-written files: their names carry the dead process's id
            for path in [p for p in out.iterdir() if _is_temporary(p)]:
                path.unlink()
        if manifest_path.exists() and len(done) == len(self.shard_names):
            return done
        manifest_path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        # The progress marker comes first: an interrupt at any later instant leaves an output that a
        # rerun recognises as this job's and resumes.
        self._save_progress(done)
        config = {k: v for k, v in self.raw_config.items() if k != "quantization_config"}
        config["quantization_config"] = self.quantization_config()
        config["torch_dtype"] = "bfloat16"
        config[manifest.MARKER] = {"recipe": self.recipe.name, "manifest": manifest.MANIFEST, "source": str(self.source)}
        manifest.write_json_atomic(out / "config.json", config)
        for name in COPIED_FILES:
            if (self.source / name).exists():
                shutil.copyfile(self.source / name, out / (name + ".tmp"))
                (out / (name + ".tmp")).replace(out / name)
        return done

    def _read_progress(self, path: Path) -> dict:
        """The progress file of an interrupted run; a damaged one is named, with the way out."""
        advice = f"the quantize progress file is corrupt: delete {self.out} and rerun `mimo quantize` to start over"
        try:
            state = limits.read_json_object(path, limits.MAX_INDEX_BYTES)
        except MimoError as error:
            raise MimoError(f"{error}; {advice}") from None
        if not isinstance(state.get("fingerprint"), str):
            raise MimoError(f"{path}: no fingerprint; {advice}")
        return state

    def _save_progress(self, done: dict) -> None:
        """Atomic: the marker is either absent or whole (its temporary file counts as nothing written)."""
        manifest.write_json_atomic(self.out / manifest.PROGRESS, {"fingerprint": self.fingerprint, "shards": done})

    def run(self, show_progress: bool, after_shard, started: float) -> QuantizeResult:
        self.fingerprint = self._fingerprint()
        done = self._start_output()
        skipped = len(done)
        if (self.out / manifest.MANIFEST).exists() and skipped == len(self.shard_names):
            return QuantizeResult(self.out, 0, skipped, time.perf_counter() - started, [], len(self.kept_mxfp4))
        pending: dict[str, dict] = {shard: {} for shard in self.shard_names if shard not in done}
        written = 0
        calibrator = Calibrator(self) if self.recipe.calibrated else None
        total = sum(self.checkpoint.entries[n].nbytes for u in self.units for n in u.tensors)
        progress = Progress(
            TextColumn("quantizing {task.fields[what]}"), BarColumn(), DownloadColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), disable=not show_progress, transient=True,
        )
        with progress, torch.no_grad():
            task = progress.add_task("quantize", total=total, what="")
            for unit in self.units:
                outputs = [o for n in unit.tensors for o in self.output_names(n)]
                needed = any(self.shard_of[o] in pending for o in outputs)
                label = {"layer": f"layer {unit.number}", "mtp": f"MTP layer {unit.number}"}.get(unit.kind, unit.tensors[0])
                progress.update(task, what=label)
                if calibrator is not None and unit.kind in ("layer", "mtp"):
                    produced = calibrator.process(unit, needed, done)
                elif needed:
                    produced = {}
                    for name in unit.tensors:
                        produced.update(self.serialize(name, None))
                else:
                    produced = {}
                for name, tensor in produced.items():
                    shard = self.shard_of[name]
                    if shard in pending:
                        pending[shard][name] = tensor
                for shard in [s for s, got in pending.items() if len(got) == len(self.shard_names[s])]:
                    tensors = pending.pop(shard)
                    write_safetensors(self.out / shard, {n: tensors[n] for n in self.shard_names[shard]})
                    done[shard] = manifest.sha256_file(self.out / shard)
                    self._save_progress(done)
                    written += 1
                    if after_shard is not None:
                        after_shard(shard)
                progress.advance(task, sum(self.checkpoint.entries[n].nbytes for n in unit.tensors))
        if pending:
            raise MimoError(f"internal: shards never completed: {sorted(pending)}")
        self._finish(done)
        return QuantizeResult(self.out, written, skipped, time.perf_counter() - started, self.rtn_fallbacks,
                              len(self.kept_mxfp4))

    def _finish(self, done: dict) -> None:
        weight_map = {name: shard for shard, names in self.shard_names.items() for name in names}
        total = sum((self.out / shard).stat().st_size for shard in self.shard_names)
        metadata = {"total_size": total}
        if self.checkpoint.row_layouts:  # fused q|k|v were read regrouped (fused_qkv.py): one shard now
            metadata["tp_size"] = 1
        manifest.write_json_atomic(self.out / INDEX_FILE, {"metadata": metadata, "weight_map": weight_map})
        files = {}
        for name in [*sorted(self.shard_names), INDEX_FILE, "config.json"]:
            path = self.out / name
            files[name] = {"sha256": done.get(name) or manifest.sha256_file(path), "bytes": path.stat().st_size}
        manifest.write_json_atomic(self.out / manifest.MANIFEST, {
            "format": "mimo-local-quant/1", "recipe": self.recipe.name, "recipe_sha256": self.recipe.sha256,
            "source": str(self.source), "fingerprint": self.fingerprint, "files": files,
        })

    # ---- tensors --------------------------------------------------------------------------------
    def read_float(self, name: str) -> torch.Tensor:
        entry = self.checkpoint.entries[name]
        tensor = torch.empty(entry.shape, dtype=torch.float32)
        self.checkpoint.read_into(name, tensor)
        return tensor

    def serialize(self, name: str, hessian: HessianAccumulator | None) -> dict[str, torch.Tensor]:
        """Output tensors of source tensor `name`: quantized per the plan, or kept (FP8 -> bf16; MXFP4
        bytes and their scales as stored)."""
        scheme = self.plan.get(name)
        if scheme is None:
            tensor = self.checkpoint.read(name)
            if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                tensor = self.read_float(name).to(torch.bfloat16)
            elif name in self.checkpoint.row_layouts:  # a fused q|k|v in TP shards: written in our row order
                tensor = self.read_float(name).to(tensor.dtype)
            return {name: tensor}
        h = None
        if scheme.calibrated and hessian is not None:
            if hessian.tokens >= scheme.min_tokens:
                h = hessian.hessian
            else:
                self.rtn_fallbacks.append(name)
        base = name[: -len(".weight")]
        serialized = runtime.serialize(self.read_float(name), scheme, h, base)
        return {f"{base}.{suffix}": tensor for suffix, tensor in serialized.items()}


def dequantized_weight(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """The float weight of hub tensor `name` from output tensors (None when `name` was kept)."""
    base = name[: -len(".weight")]
    stored = {k[len(base) + 1:]: v for k, v in tensors.items() if k.startswith(base + ".") and k != base + ".bias"}
    if base + ".qweight" in tensors or base + ".SCB" in tensors or base + ".weight.absmax" in tensors:
        from .linear import QuantLinear

        weight = runtime.from_checkpoint(_TensorSource(tensors), base, stored)
        out_features = next(iter(weight.tensors.values())).shape[0]
        in_features = weight.perm.numel() if weight.perm is not None else _in_features(weight)
        module = QuantLinear(weight.kind, in_features, out_features, group_size=weight.group_size,
                             blocksize=weight.blocksize, permuted=weight.perm is not None)
        for key, value in weight.tensors.items():
            getattr(module, key).copy_(value)
        if weight.perm is not None:
            module.perm.copy_(weight.perm)
        if weight.code is not None:
            module.code.copy_(weight.code)
        return module.dequantize()
    return None


def _in_features(weight) -> int:
    return weight.tensors["qweight"].shape[1] if weight.kind == "int8" else weight.tensors["packed"].shape[1] * 2


class _TensorSource:
    """A dict of tensors that answers the `in` test runtime.stored_format asks of a Checkpoint."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors


class Calibrator:
    """GPTQ's layer-sequential pass: calibration hidden states flow through each layer with its
    weights already quantized, and each layer's linear inputs give the Hessians of its weights."""

    def __init__(self, job: QuantizeJob):
        self.job = job
        text, tokens, length = job.calibration
        ids = calibration_ids(job.source, text, tokens)
        length = min(length, len(ids))
        rows = len(ids) // length
        self.ids = torch.tensor(ids[: rows * length]).view(rows, 1, length)
        embed = job.read_float("model.embed_tokens.weight")
        self.embeddings = F.embedding(self.ids, embed)  # [rows, 1, T, H]: layer 0 input and MTP token input
        del embed
        self.hidden = self.embeddings.clone()
        self.final_hidden = None

    def _materialize(self, module, prefix: str):
        """Give `module` real memory and its source weights."""
        module.to_empty(device="cpu")
        for rope in (m for m in module.modules() if isinstance(m, RotaryEmbedding)):
            rope.inv_freq = rope.compute_inv_freq()
            rope._tables.clear()
        params = dict(self.job.model.named_parameters())
        for hub_name, target in self.job.targets.items():
            if not target.param.startswith(prefix):
                continue
            destination = params[target.param][target.index] if target.index else params[target.param]
            self.job.checkpoint.read_into(hub_name, destination)

    def _assign(self, weights: dict[str, torch.Tensor]) -> None:
        """Put (dequantized) weights where the forward pass reads them."""
        params = dict(self.job.model.named_parameters())
        for hub_name, weight in weights.items():
            target = self.job.targets[hub_name]
            (params[target.param][target.index] if target.index else params[target.param]).copy_(weight)

    def process(self, unit: Unit, needed: bool, done: dict) -> dict[str, torch.Tensor]:
        job = self.job
        module = job.model.layers[unit.number] if unit.kind == "layer" else job.model.mtp_layers[unit.number]
        prefix = f"{'layers' if unit.kind == 'layer' else 'mtp_layers'}.{unit.number}."
        # Routers stay fp32 as at run time; everything else computes in fp32 too.
        for router in (m for m in module.modules() if isinstance(m, Router)):
            router.float()
        outputs: dict[str, torch.Tensor] = {}
        if not needed and unit.kind == "mtp":  # nothing reads an MTP layer's outputs
            return outputs
        self._materialize(module, prefix)
        if needed:
            hessians = self._collect(unit, module)
            quantized = {}
            for name in unit.tensors:
                serialized = job.serialize(name, hessians.get(name))
                outputs.update(serialized)
                weight = dequantized_weight(serialized, name)
                if weight is not None:
                    quantized[name] = weight
            self._assign(quantized)
        else:  # every output of this layer is written: replay it from the output shards
            self._assign(self._written_weights(unit, done))
        if unit.kind == "layer":
            self.hidden = torch.stack([self._run(unit, module, rows) for rows in self._inputs(unit)])
            if unit.number == len(job.model.layers) - 1:
                self.final_hidden = self.hidden
        module.to(device="meta")
        return outputs

    def _written_weights(self, unit: Unit, done: dict) -> dict[str, torch.Tensor]:
        job = self.job
        weights = {}
        for name in unit.tensors:
            if name not in job.plan:
                continue
            tensors = {}
            for output in job.output_names(name):
                entry = next(e for e in read_header(job.out / job.shard_of[output]) if e.name == output)
                tensors[output] = torch.empty(entry.shape, dtype=entry.dtype)
                Checkpoint._read_bytes(entry, tensors[output])
            weights[name] = dequantized_weight(tensors, name)
        return weights

    def _inputs(self, unit: Unit):
        """Per calibration row, the module's inputs: hidden states, or (target hidden, next embeddings)."""
        for row in range(self.ids.shape[0]):
            if unit.kind == "layer":
                yield (self.hidden[row],)
            else:
                shift = unit.number + 1
                yield (self.final_hidden[row][:, :-shift], self.embeddings[row][:, shift:])

    def _run(self, unit: Unit, module, inputs) -> torch.Tensor:
        steps = inputs[0].shape[1]
        spec = module.self_attn.spec if unit.kind == "layer" else module.block.self_attn.spec
        cache = make_layer_cache(spec, steps, 8, 1, torch.float32, torch.device("cpu"))
        if unit.kind == "layer":
            return module(inputs[0], 0, cache)
        return module(inputs[0], inputs[1], 0, cache)

    def _collect(self, unit: Unit, module) -> dict[str, HessianAccumulator]:
        """Hessian accumulators of every calibrated weight of the unit, from forward hooks."""
        job = self.job
        calibrated = [n for n in unit.tensors if n in job.plan and job.plan[n].calibrated]
        if not calibrated:
            return {}
        accumulators: dict[str, HessianAccumulator] = {}
        hooks = []
        by_module: dict[str, list[str]] = {}
        experts: dict[str, list[str]] = {}
        candidates = linear_targets(job.model, job.targets)
        for name in calibrated:
            path, stack = candidates[name]
            (experts if stack is not None else by_module).setdefault(path, []).append(name)
        for path, names in by_module.items():
            linear = job.model.get_submodule(path)
            shared = HessianAccumulator(linear.in_features)
            for name in names:
                accumulators[name] = shared  # q/k/v (gate/up) see the same inputs
            hooks.append(linear.register_forward_pre_hook(lambda _m, args, acc=shared: acc.add(args[0])))
        if experts:
            moe = next(m for m in module.modules() if hasattr(m, "gate") and isinstance(m.gate, Router))
            hooks.append(moe.register_forward_pre_hook(lambda _m, args: self._expert_inputs(unit, args[0], moe, accumulators)))
        try:
            for rows in self._inputs(unit):
                self._run(unit, module, rows)
        finally:
            for hook in hooks:
                hook.remove()
        return accumulators

    def _expert_inputs(self, unit: Unit, x: torch.Tensor, moe, accumulators: dict) -> None:
        job = self.job
        tokens = x.reshape(-1, x.shape[-1])
        chosen, _ = moe.gate(tokens)
        params = dict(job.model.named_parameters())
        hub = f"model.layers.{unit.number}.mlp.experts."
        for expert in range(moe.spec.num_experts):
            rows = tokens[(chosen == expert).any(dim=-1)]
            names = {p: f"{hub}{expert}.{p}_proj.weight" for p in ("gate", "up", "down")}
            if names["gate"] not in accumulators:
                accumulators[names["gate"]] = accumulators[names["up"]] = HessianAccumulator(tokens.shape[-1])
                accumulators[names["down"]] = HessianAccumulator(moe.spec.intermediate_size)
            accumulators[names["gate"]].add(rows)
            if rows.shape[0]:
                gate, up = (self._weight(params, names[p]) for p in ("gate", "up"))
                accumulators[names["down"]].add(F.silu(F.linear(rows, gate)) * F.linear(rows, up))

    def _weight(self, params: dict, hub_name: str) -> torch.Tensor:
        target = self.job.targets[hub_name]
        return params[target.param][target.index]
