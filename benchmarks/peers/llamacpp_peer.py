"""Peer benchmark: llama.cpp (through llama-cpp-python) on a MiMo checkpoint in Hugging Face hub layout.

The checkpoint is converted to GGUF with llama.cpp's own convert_hf_to_gguf.py (cached in --cache-dir),
then prefill and greedy decode speed are measured on a fixed prompt of token ids. Prints one JSON line.

    /work/llvenv/bin/python benchmarks/peers/llamacpp_peer.py --checkpoint DIR --outtype bf16

Supported checkpoints:
  * MiMo-7B (model_type "mimo"): converted as Qwen2, the MTP layer (model.mtp_layers.*) is dropped.
  * MiMo-V2-Flash (model_type "mimo_v2_flash"): converted natively (llama.cpp arch "mimo2"), MTP dropped.
    FP8 block-quantized weights (weight_scale_inv) are dequantized by the converter.
  * MiMo-V2.5 / V2.6 (model_type "mimo_v2", fused FP8 q|k|v): the same; V2.6's MXFP4 routed experts
    are repacked as stored into ggml's MXFP4 type whatever --outtype says.
"""

import argparse
import ctypes
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PYTHON = "/work/llvenv/bin/python"
DEFAULT_LLAMACPP_GLOB = "/tmp/llx/*/vendor/llama.cpp"
DEFAULT_CACHE_DIR = "~/.cache/mimo-local/llamacpp_peer"
FIRST_PROMPT_ID = 100
# Quantized types the converter writes directly; the others are made from a bf16 GGUF by llama.cpp.
CONVERTER_OUTTYPES = ("f32", "bf16", "q8_0")
QUANTIZE_FTYPES = {"q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}

# Runs convert_hf_to_gguf.py in-process with three patches (the vendored file stays untouched):
#  * config.json is read as written; otherwise a transformers release that knows mimo_v2_flash
#    rewrites it (per-layer-type rope_parameters) into a form the converter's mimo2 class rejects;
#  * a tokenizer whose pre-tokenizer hash llama.cpp does not know is declared "qwen2" (the MiMo
#    tokenizers are Qwen2 byte-level BPE) instead of aborting the conversion;
#  * tensors whose names start with DROP_PREFIX (if non-empty) are skipped.
# argv: LLAMACPP_DIR DROP_PREFIX converter-args...
CONVERT_SHIM = r"""
import json, runpy, sys
llamacpp_dir, drop_prefix = sys.argv[1], sys.argv[2]
sys.path[:0] = [llamacpp_dir, llamacpp_dir + "/gguf-py"]
from conversion.base import ModelBase, TextModel

def load_hparams(dir_model, is_mistral_format):
    with open(dir_model / "config.json", encoding="utf-8") as f:
        return json.load(f)
ModelBase.load_hparams = staticmethod(load_hparams)

_vocab_base_pre = TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return _vocab_base_pre(self, tokenizer)
    except NotImplementedError:
        return "qwen2"
TextModel.get_vocab_base_pre = get_vocab_base_pre

if drop_prefix:
    _filter_tensors = ModelBase.filter_tensors.__func__
    def filter_tensors(cls, item):
        return None if item[0].startswith(drop_prefix) else _filter_tensors(cls, item)
    ModelBase.filter_tensors = classmethod(filter_tensors)

sys.argv = [llamacpp_dir + "/convert_hf_to_gguf.py"] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class PeerError(Exception):
    pass


def physical_cores():
    cores = set()
    physical_id = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "physical id":
                physical_id = value
            elif key == "core id":
                cores.add((physical_id, value))
    return len(cores) or os.cpu_count() or 1


def find_llamacpp_dir(explicit):
    candidates = [explicit] if explicit else sorted(glob.glob(DEFAULT_LLAMACPP_GLOB))
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "convert_hf_to_gguf.py")):
            return os.path.abspath(candidate)
    raise PeerError(f"no convert_hf_to_gguf.py in {explicit or DEFAULT_LLAMACPP_GLOB}; pass --llamacpp-dir")


def converter_config(config):
    """Return (config to give the converter, tensor-name prefix to drop, extra converter args)."""
    model_type = config.get("model_type")
    if model_type == "mimo":
        # MiMo-7B's main path is exactly Qwen2 (q/k/v biases included); llama.cpp has no MiMo-7B MTP.
        config = dict(config, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
        return config, "model.mtp_layers.", []
    if model_type in ("mimo_v2_flash", "mimo_v2"):
        # The converter writes "sliding_window" as llama.cpp's n_swa, under which a query sees
        # n_swa keys including itself. MiMo's sliding layers see the query plus sliding_window_size
        # earlier tokens (as transformers does, which sets sliding_window = size + 1).
        if "sliding_window_size" not in config:
            raise PeerError("config.json has no sliding_window_size")
        config = dict(config, sliding_window=config["sliding_window_size"] + 1)
        return config, "", ["--no-mtp"]
    raise PeerError(f"unsupported model_type {model_type!r} (expected 'mimo', 'mimo_v2_flash' or 'mimo_v2')")


def convert(checkpoint, outtype, out_path, llamacpp_dir, python):
    with open(checkpoint / "config.json") as f:
        config, drop_prefix, extra_args = converter_config(json.load(f))
    if not any(checkpoint.glob("*.safetensors")):
        raise PeerError(f"{checkpoint} has no *.safetensors files")
    with tempfile.TemporaryDirectory(prefix="llamacpp_peer_") as staging:
        # Same files (symlinked) but the rewritten config.json.
        for entry in checkpoint.iterdir():
            if entry.name != "config.json":
                os.symlink(entry.resolve(), os.path.join(staging, entry.name))
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        partial = out_path.with_name(out_path.name + ".partial")
        cmd = [python, "-c", CONVERT_SHIM, llamacpp_dir, drop_prefix, staging, "--outtype", outtype,
               "--outfile", str(partial), "--model-name", checkpoint.name, *extra_args]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise PeerError(f"convert_hf_to_gguf.py failed: {lines[-1] if lines else result.returncode}")
    partial.rename(out_path)


def quantize(llama_cpp, src, dst, ftype_name, threads):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = threads
    partial = dst.with_name(dst.name + ".partial")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        raise PeerError(f"llama_model_quantize to {ftype_name} failed")
    partial.rename(dst)


def is_fresh(gguf, checkpoint):
    if not gguf.exists():
        return False
    # Files only: mimo-local's runtime layouts (.mimo-runtime/) change the folder, not the weights.
    newest_input = max(p.stat().st_mtime for p in checkpoint.iterdir() if p.is_file())
    return gguf.stat().st_mtime > newest_input


def gguf_path(checkpoint, cache_dir, outtype):
    tag = hashlib.sha1(str(checkpoint).encode()).hexdigest()[:8]
    return cache_dir / f"{checkpoint.name}-{tag}-{outtype}.gguf"


def ensure_gguf(llama_cpp, args, checkpoint):
    cache_dir = Path(args.cache_dir).expanduser().resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = gguf_path(checkpoint, cache_dir, args.outtype)
    if is_fresh(target, checkpoint):
        return target
    llamacpp_dir = find_llamacpp_dir(args.llamacpp_dir)
    if args.outtype in CONVERTER_OUTTYPES:
        convert(checkpoint, args.outtype, target, llamacpp_dir, args.python)
    else:
        source = gguf_path(checkpoint, cache_dir, "bf16")
        if not is_fresh(source, checkpoint):
            convert(checkpoint, "bf16", source, llamacpp_dir, args.python)
        quantize(llama_cpp, source, target, QUANTIZE_FTYPES[args.outtype], args.threads)
    return target


def timed_run(llama_cpp, llm, sampler, prompt, gen_tokens):
    """Prefill the prompt, then decode gen_tokens tokens with `sampler`. EOS is never checked, so the
    decode always runs the full length. Returns (prefill seconds, decode seconds)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefilled = time.perf_counter()
    for _ in range(gen_tokens):
        token = llama_cpp.llama_sampler_sample(sampler, llm.ctx, -1)
        llm.eval([token])
    decoded = time.perf_counter()
    return prefilled - start, decoded - prefilled


def make_sampler(llama_cpp, temperature: float, top_p: float, seed: int):
    """Greedy at temperature 0; else temperature, then top-p, then a seeded draw (the order of
    mimo-local's sampler)."""
    if temperature == 0:
        return llama_cpp.llama_sampler_init_greedy()
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
    if top_p < 1.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(top_p, 1))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


def benchmark(llama_cpp, args, gguf):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=args.prompt_tokens + args.gen_tokens + 1,
                n_batch=args.batch or args.prompt_tokens, n_ubatch=args.ubatch or args.prompt_tokens,
                n_threads=args.threads,
                n_threads_batch=args.threads, flash_attn=args.flash_attn, verbose=args.verbose)
    n_vocab = llm.n_vocab()
    if n_vocab <= FIRST_PROMPT_ID:
        raise PeerError(f"vocabulary of {n_vocab} tokens is too small")
    prompt = [FIRST_PROMPT_ID + i % (n_vocab - FIRST_PROMPT_ID) for i in range(args.prompt_tokens)]
    sampler = make_sampler(llama_cpp, args.temperature, args.top_p, args.seed)
    try:
        timed_run(llama_cpp, llm, sampler, prompt, min(args.gen_tokens, 8))  # warm-up
        runs = [timed_run(llama_cpp, llm, sampler, prompt, args.gen_tokens) for _ in range(args.repeats)]
    finally:
        llama_cpp.llama_sampler_free(sampler)
        llm.close()
    return args.prompt_tokens / min(r[0] for r in runs), args.gen_tokens / min(r[1] for r in runs)


_log_callback = None


def silence_llama_logs(llama_cpp):
    """Drop llama.cpp's log lines (load notes, quantization progress). Llama(verbose=False) alone
    does not: llama-cpp-python maps this llama.cpp's warning level to logging.ERROR and prints it."""
    global _log_callback  # must outlive the call: llama.cpp keeps the pointer
    _log_callback = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="hub-layout MiMo checkpoint directory")
    parser.add_argument("--outtype", default="bf16", choices=[*CONVERTER_OUTTYPES, *QUANTIZE_FTYPES])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=physical_cores(), help="default: physical cores")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best one is reported")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flash-attn", action="store_true", help="enable llama.cpp flash attention")
    parser.add_argument("--batch", type=int, default=0, help="n_batch (default: the prompt length)")
    parser.add_argument("--ubatch", type=int, default=0, help="n_ubatch (default: the prompt length)")
    parser.add_argument("--verbose", action="store_true", help="show llama.cpp's own log")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where GGUF files are kept")
    parser.add_argument("--llamacpp-dir", help="llama.cpp source tree with convert_hf_to_gguf.py "
                        f"(default: {DEFAULT_LLAMACPP_GLOB})")
    parser.add_argument("--python", default=DEFAULT_PYTHON,
                        help="interpreter with llama_cpp, torch, transformers (runs the converter)")
    args = parser.parse_args()
    if args.prompt_tokens < 1 or args.gen_tokens < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--prompt-tokens, --gen-tokens, --repeats and --threads must be positive")
    return args


def main():
    args = parse_args()
    try:
        import llama_cpp
    except ImportError:
        # A venv is told apart by its interpreter's path, not by the binary it links to.
        if os.path.exists(args.python) and os.path.abspath(args.python) != os.path.abspath(sys.executable):
            os.execv(args.python, [args.python, os.path.abspath(__file__), *sys.argv[1:]])
        print(f"error: llama_cpp is not importable by {sys.executable}", file=sys.stderr)
        return 1
    if not args.verbose:
        silence_llama_logs(llama_cpp)
    try:
        checkpoint = Path(args.checkpoint).resolve()
        if not (checkpoint / "config.json").is_file():
            raise PeerError(f"{checkpoint} has no config.json")
        gguf = ensure_gguf(llama_cpp, args, checkpoint)
        prefill, decode = benchmark(llama_cpp, args, gguf)
    except PeerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # one clear line instead of a traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"engine": "llama.cpp", "outtype": args.outtype, "prefill_tokens_per_s": round(prefill, 2),
                      "decode_tokens_per_s": round(decode, 2), "threads": args.threads, "gguf": str(gguf),
                      "llama_cpp_version": llama_cpp.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
