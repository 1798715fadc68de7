"""Train the two demo models shipped in mimo_local/demo_models/ (mimo-nano, mimo-nano-moe).

    python examples/train_demo_models.py [--only mimo-nano] [--steps N] [--out DIR]

Corpus: Jane Austen's six novels (public domain) as packaged by Debian in `r-cran-janeaustenr`
(MIT), fetched with `apt-get download` and checked by sha256. The last 3% of each novel is the
validation split; a piece of it ships as demo_models/heldout.txt for the tests.
Everything is seeded: same corpus + same seed + same steps = same weights (up to CPU float
nondeterminism in thread scheduling). Hyperparameters, timings and results are written into each
model folder (training.json, TRAINING.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mimo_local.checkpoint import write_safetensors  # noqa: E402
from mimo_local.dev.tiny import hub_config  # noqa: E402
from mimo_local.dev.tokenizer_files import train_tokenizer, write_tokenizer_files  # noqa: E402
from trainable_mimo import MoE, TrainableMiMo  # noqa: E402

CORPUS_PACKAGE = "r-cran-janeaustenr"
CORPUS_DEB = "r-cran-janeaustenr_1.0.0-1_all.deb"
CORPUS_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
VALIDATION_FRACTION = 0.03
HELDOUT_CHARS = 6000
VOCAB_SIZE = 4096
SEQ_LEN = 256
SEED = 1234

MODELS = {
    "mimo-nano": dict(
        family="mimo",
        shape=dict(vocab_size=VOCAB_SIZE, hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
                   num_key_value_heads=2, intermediate_size=512, mtp_layers=1),
        steps=3000, batch=4, lr=1.5e-3,
    ),
    "mimo-nano-moe": dict(
        family="mimo_v2_flash",
        shape=dict(vocab_size=VOCAB_SIZE, hidden_size=192, num_hidden_layers=6, num_attention_heads=6,
                   num_key_value_heads=1, swa_num_key_value_heads=2, head_dim=48, v_head_dim=32,
                   intermediate_size=512, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                   sliding_window_size=64, mtp_layers=3),
        steps=1200, batch=4, lr=1.5e-3,
    ),
}
CHAT_FRACTION = 0.25  # share of training sequences in ChatML form (user: an opening, assistant: the rest)
MTP_LOSS_WEIGHT = 0.3
MTP_LOSS_STRIDE = 4
BIAS_UPDATE_SPEED = 1e-3  # aux-loss-free balancing: e_score_correction_bias += speed * sign(mean - load)
WARMUP_STEPS = 40


# ---------------------------------------------------------------- corpus

def fetch_corpus_deb(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    deb = cache / CORPUS_DEB
    if not deb.exists():
        subprocess.run(["apt-get", "download", f"{CORPUS_PACKAGE}=1.0.0-1"], cwd=cache, check=True)
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    if digest != CORPUS_SHA256:
        raise SystemExit(f"{deb}: sha256 {digest} does not match {CORPUS_SHA256}")
    return deb


def read_r_character_vectors(rdb: bytes) -> list[list[str]]:
    """The character vectors of an R lazy-load database (zlib blobs of XDR-serialized objects)."""
    vectors, position = [], 0
    while position < len(rdb):
        size = struct.unpack(">I", rdb[position : position + 4])[0]
        inflater = zlib.decompressobj()
        raw = inflater.decompress(rdb[position + 4 :])
        assert len(raw) == size and raw[:2] == b"X\n"
        position = len(rdb) - len(inflater.unused_data)
        offset = 14
        if struct.unpack(">i", raw[2:6])[0] == 3:  # version 3 names the native encoding
            offset += 4 + struct.unpack(">i", raw[offset : offset + 4])[0]
        kind, length = struct.unpack(">ii", raw[offset : offset + 8])
        if kind & 0xFF != 16:  # STRSXP
            continue
        offset += 8
        lines = []
        for _ in range(length):
            _, count = struct.unpack(">ii", raw[offset : offset + 8])
            offset += 8
            lines.append(raw[offset : offset + max(count, 0)].decode("utf-8"))
            offset += max(count, 0)
        vectors.append(lines)
    return vectors


def novels(deb: Path) -> dict[str, list[str]]:
    """Title -> paragraphs (lines joined, Gutenberg _italics_ marks dropped)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        vectors = read_r_character_vectors((Path(tmp) / RDATA).read_bytes())
    books = {}
    for lines in vectors:
        paragraphs, current = [], []
        for line in lines + [""]:
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(re.sub(r"_(\S[^_]*?)_", r"\1", " ".join(current)))
                current = []
        books[paragraphs[0].title()] = paragraphs
    return books


def split_corpus(books: dict[str, list[str]]):
    train, validation = [], []
    for paragraphs in books.values():
        cut = int(len(paragraphs) * (1 - VALIDATION_FRACTION))
        train.append(paragraphs[:cut])
        validation.append(paragraphs[cut:])
    return train, validation


def write_word_list(train_books: list[list[str]], out: Path) -> None:
    """Every distinct lower-case word of the training split, one per line: the tests call generated
    text English-looking when most of its words are words the model was trained on."""
    words = {w.lower() for book in train_books for p in book for w in re.findall(r"[A-Za-z]+", p)}
    (out / "words.txt").write_text("\n".join(sorted(words)) + "\n")


# ---------------------------------------------------------------- data

class Batches:
    """Random training windows: plain text from the token stream, or a ChatML exchange whose
    user turn opens a paragraph and whose assistant turn continues it (so `mimo run PROMPT`,
    which applies the chat template, continues the user's text)."""

    def __init__(self, tokenizer, train_books: list[list[str]], rng: random.Random):
        self.rng = rng
        self.pad = tokenizer.token_to_id("<|endoftext|>")
        documents = ["\n\n".join(paragraphs) for paragraphs in train_books]
        ids = []
        for encoding in tokenizer.encode_batch(documents):
            ids += encoding.ids + [self.pad]
        self.stream = torch.tensor(ids)
        self.openings = []
        for book in train_books:
            for i, paragraph in enumerate(book):
                if len(paragraph.split()) >= 12:
                    self.openings.append((paragraph, book[i + 1 : i + 3]))
        self.tokenizer = tokenizer

    def chat_sample(self) -> list[int]:
        paragraph, following = self.rng.choice(self.openings)
        words = paragraph.split()
        cut = self.rng.randint(3, 10)
        user, rest = " ".join(words[:cut]), " ".join(words[cut:])
        rest = "\n\n".join([rest] + following) if self.rng.random() < 0.5 else rest
        text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{rest}<|im_end|>\n"
        return self.tokenizer.encode(text).ids

    def next(self, batch: int):
        ids = torch.full((batch, SEQ_LEN + 1), self.pad)
        labels = torch.full((batch, SEQ_LEN + 1), -100)
        for row in range(batch):
            if self.rng.random() < CHAT_FRACTION:
                sample = torch.tensor(self.chat_sample()[: SEQ_LEN + 1])
            else:
                start = self.rng.randrange(len(self.stream) - SEQ_LEN - 1)
                sample = self.stream[start : start + SEQ_LEN + 1]
            ids[row, : len(sample)] = sample
            labels[row, : len(sample)] = sample
        return ids, labels


def validation_windows(tokenizer, validation_books: list[list[str]]) -> torch.Tensor:
    pad = tokenizer.token_to_id("<|endoftext|>")
    ids = []
    for encoding in tokenizer.encode_batch(["\n\n".join(b) for b in validation_books]):
        ids += encoding.ids + [pad]
    count = len(ids) // (SEQ_LEN + 1)
    return torch.tensor(ids[: count * (SEQ_LEN + 1)]).view(count, SEQ_LEN + 1)


# ---------------------------------------------------------------- model

def initialize(model: TrainableMiMo, generator: torch.Generator) -> None:
    layers = model.config["num_hidden_layers"]
    for name, param in model.named_parameters():
        if "norm" in name:
            torch.nn.init.ones_(param)
        elif name.endswith(".bias") or name.endswith("attention_sink_bias"):
            torch.nn.init.zeros_(param)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(param, std=0.02 / math.sqrt(2 * layers), generator=generator)
        else:
            torch.nn.init.normal_(param, std=0.02, generator=generator)


def losses(model: TrainableMiMo, ids: torch.Tensor, labels: torch.Tensor):
    """Main next-token loss and one loss per MTP layer (k predicts the token k+2 ahead of its
    hidden state). MTP layers read the target hidden state detached: they learn to draft for the
    main model without pulling its representation towards far-ahead targets."""
    logits, hidden = model(ids)
    main = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten())
    mtp = []
    for k in range(len(model.mtp)):
        # positions 0..T-k-3 have a target; the loss reads every MTP_LOSS_STRIDE-th of them
        mtp_logits = model.mtp_logits(k, hidden.detach(), ids[:, :-1], every=MTP_LOSS_STRIDE)
        targets = labels[:, k + 2 :][:, ::MTP_LOSS_STRIDE]
        mtp.append(F.cross_entropy(mtp_logits.float().flatten(0, 1), targets.flatten()))
    return main, mtp


def update_router_biases(model: TrainableMiMo) -> None:
    for moe in model.moe_layers():
        load = moe.last_load.float()
        moe.gate.e_score_correction_bias += BIAS_UPDATE_SPEED * torch.sign(load.mean() - load)


@torch.no_grad()
def evaluate(model: TrainableMiMo, windows: torch.Tensor, batch: int = 16) -> dict:
    """Validation perplexity; per MTP layer the share of positions where its argmax equals the
    main model's argmax at the position it drafts (what greedy speculation accepts); expert load."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    agree = [0] * len(model.mtp)
    compared = [0] * len(model.mtp)
    loads = [torch.zeros(len(m.experts)) for m in model.moe_layers()]
    for begin in range(0, len(windows), batch):
        ids = windows[begin : begin + batch]
        logits, hidden = model(ids)
        total_loss += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        total_tokens += ids[:, 1:].numel()
        target_choice = logits.argmax(-1)  # position j predicts x_{j+1}
        for k in range(len(model.mtp)):
            draft = model.mtp_logits(k, hidden, ids).argmax(-1)  # position i drafts x_{i+k+2}
            wanted = target_choice[:, k + 1 : k + 1 + draft.shape[1]]
            agree[k] += (draft == wanted).sum().item()
            compared[k] += draft.numel()
        for load, moe in zip(loads, model.moe_layers()):
            load += moe.last_load.float()
    model.train()
    result = {
        "validation_tokens": total_tokens,
        "validation_loss": total_loss / total_tokens,
        "validation_perplexity": math.exp(total_loss / total_tokens),
        "mtp_agreement_with_target_argmax": [a / c for a, c in zip(agree, compared)],
    }
    if loads:
        result["expert_load_share"] = [[round(x, 4) for x in (load / load.sum()).tolist()] for load in loads]
        result["expert_load_max_over_mean"] = [round((load.max() / load.mean()).item(), 3) for load in loads]
    return result


def export(model: TrainableMiMo, tokenizer, config: dict, out_dir: Path, extra_files: dict[str, str]) -> None:
    """The hub layout, written to a temp folder and renamed into place."""
    temporary = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    special = write_tokenizer_files(temporary, tokenizer)
    config = dict(config, bos_token_id=None, eos_token_id=special["<|im_end|>"], pad_token_id=special["<|endoftext|>"])
    (temporary / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"eos_token_id": [special["<|im_end|>"], special["<|endoftext|>"]], "temperature": 0.6,
                  "top_p": 0.95, "transformers_version": "4.51.0"}
    (temporary / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tensors = {}
    for name, tensor in model.state_dict().items():
        keep_fp32 = name.endswith("e_score_correction_bias")
        tensors[name] = tensor.detach().float().contiguous() if keep_fp32 else tensor.detach().to(torch.bfloat16)
    write_safetensors(temporary / "model.safetensors", tensors)
    for name, text in extra_files.items():
        (temporary / name).write_text(text)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(temporary, out_dir)


# ---------------------------------------------------------------- reports

LICENSE_TEXT = """Model weights and tokenizer: Apache-2.0, like mimo-local (trained from scratch by
examples/train_demo_models.py; no weights of any other model were used).

Training text: the six novels of Jane Austen (Sense and Sensibility, Pride and Prejudice, Mansfield
Park, Emma, Northanger Abbey, Persuasion), public domain, as packaged in the Debian package
r-cran-janeaustenr 1.0.0-1 (CRAN package janeaustenr by Julia Silge, MIT licence:
Copyright 2016-2017 Julia Silge; the novels' texts themselves are in the public domain).
demo_models/heldout.txt is an excerpt of that public-domain text (the validation split).
"""


def training_markdown(name: str, record: dict) -> str:
    r = record
    lines = [
        f"# {name}",
        "",
        f"A demo {r['architecture']} trained from scratch on CPU by `examples/train_demo_models.py` "
        "on Jane Austen's novels (see LICENSE). It writes Austen-flavoured English; it knows nothing else.",
        "",
        f"- parameters: {r['parameters']:,} (bf16 weights, {r['weights_bytes'] / 1e6:.1f} MB)",
        f"- tokenizer: byte-level BPE, {r['vocab_size']} tokens, ChatML specials",
        f"- seed {r['seed']}, {r['steps']} steps x batch {r['batch']} x {r['seq_len']} tokens "
        f"({r['train_tokens_seen']:,} tokens seen), AdamW lr {r['lr']} (warmup {r['warmup_steps']}, cosine), "
        f"weight decay {r['weight_decay']}, bf16 autocast",
        f"- {r['chat_fraction']:.0%} of sequences in ChatML form (user: a paragraph's opening words, "
        "assistant: the rest), so the chat-templated prompt of `mimo run` is continued",
        f"- MTP: {r['mtp_layers']} layer(s), loss weight {r['mtp_loss_weight']}, layer k predicts token t+k+2 "
        "from the target hidden state at t (detached) and the embedding of token t+k+1",
        f"- training wall time: {r['train_seconds'] / 60:.1f} min on {r['machine']}",
        "",
        "## Results (validation split: last 3% of each novel)",
        "",
        f"- validation perplexity: {r['eval']['validation_perplexity']:.2f} "
        f"(loss {r['eval']['validation_loss']:.4f} over {r['eval']['validation_tokens']:,} tokens)",
        "- MTP draft agreement with the target's greedy token, per layer: "
        + ", ".join(f"{a:.3f}" for a in r["eval"]["mtp_agreement_with_target_argmax"]),
    ]
    if "expert_load_max_over_mean" in r["eval"]:
        lines.append("- expert load max/mean per MoE layer: " + ", ".join(map(str, r["eval"]["expert_load_max_over_mean"])))
    lines += ["", "Full record: training.json.", ""]
    return "\n".join(lines)


def engine_measurements(folder: Path, heldout: Path) -> dict:
    """What the shipped checkpoint does through the real loader and generator (bf16): held-out
    perplexity in 256-token windows, and a greedy chat-templated story with MTP speculation."""
    from mimo_local.engine import Engine
    from mimo_local.sampling import SamplingSettings

    engine = Engine.load(folder, device="cpu")
    ids = torch.tensor(engine.tokenizer.encode(heldout.read_text()))
    total = 0.0
    for window in ids.split(SEQ_LEN):
        logits = engine.model(window[None], engine.model.new_cache(len(window)), all_logits=True).logits[0, :-1]
        total += F.cross_entropy(logits.float(), window[1:], reduction="sum").item()
    prompt = "Once upon a time"
    settings = SamplingSettings(temperature=0.0, max_tokens=64)
    stats = list(engine.stream(engine.prompt_ids(prompt), settings, **engine.speculation(True)))[-1].stats
    return {
        "heldout_file": heldout.name,
        "heldout_tokens": len(ids),
        "heldout_perplexity_bf16": math.exp(total / (len(ids) - len(ids.split(SEQ_LEN)))),
        "greedy_prompt": prompt,
        "greedy_text": stats.text,
        "mtp_mean_accepted_length": stats.speculation.mean_accepted_length,
    }


def add_engine_measurements(folder: Path, heldout: Path) -> None:
    record = json.loads((folder / "training.json").read_text())
    record["engine"] = engine_measurements(folder, heldout)
    engine = record["engine"]
    markdown = training_markdown(folder.name, record) + "\n".join([
        "## Through the engine (bf16, `mimo run`)",
        "",
        f"- {engine['heldout_file']} perplexity: {engine['heldout_perplexity_bf16']:.2f} "
        f"({engine['heldout_tokens']} tokens, {SEQ_LEN}-token windows)",
        f"- MTP mean accepted length, greedy, 64 tokens from \"{engine['greedy_prompt']}\": "
        f"{engine['mtp_mean_accepted_length']:.2f}",
        "- greedy output (chat template applied, as `mimo run` does):",
        "",
        "> " + engine["greedy_text"].replace("\n", "\n> "),
        "",
    ])
    for name, text in (("training.json", json.dumps(record, indent=2) + "\n"), ("TRAINING.md", markdown)):
        temporary = folder / (name + ".tmp")
        temporary.write_text(text)
        os.replace(temporary, folder / name)


# ---------------------------------------------------------------- main

def train_one(name: str, spec: dict, steps: int, tokenizer, batches: Batches, windows, out_root: Path) -> dict:
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    shape = spec["shape"]
    config = hub_config(spec["family"], shape, fp8=False)
    model = TrainableMiMo(config, shape["mtp_layers"])
    initialize(model, generator)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=spec["lr"], betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / WARMUP_STEPS) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))),
    )
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    print(f"{name}: {params:,} parameters, {steps} steps", flush=True)
    started = time.time()
    for step in range(steps):
        ids, labels = batches.next(spec["batch"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            main, mtp = losses(model, ids, labels)
        loss = main + MTP_LOSS_WEIGHT * sum(mtp) / max(len(mtp), 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            update_router_biases(model)
        if step % 25 == 0 or step == steps - 1:
            elapsed = time.time() - started
            print(f"{name} step {step} loss {main.item():.3f} mtp {[round(x.item(), 3) for x in mtp]} "
                  f"{elapsed:.0f}s", flush=True)
    train_seconds = time.time() - started
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = evaluate(model, windows)
    print(f"{name}: {result}", flush=True)
    record = {
        "name": name,
        "architecture": {"mimo": "MiMo-7B-architecture model (model_type mimo)",
                         "mimo_v2_flash": "MiMo-V2-Flash-architecture model (model_type mimo_v2_flash)"}[spec["family"]],
        "family": spec["family"],
        "shape": shape,
        "parameters": params,
        "weights_bytes": sum(p.numel() * 2 for p in model.parameters()) + sum(b.numel() * 4 for b in model.buffers()),
        "vocab_size": VOCAB_SIZE,
        "seed": SEED,
        "steps": steps,
        "batch": spec["batch"],
        "seq_len": SEQ_LEN,
        "train_tokens_seen": steps * spec["batch"] * SEQ_LEN,
        "lr": spec["lr"],
        "warmup_steps": WARMUP_STEPS,
        "weight_decay": 0.1,
        "chat_fraction": CHAT_FRACTION,
        "mtp_layers": shape["mtp_layers"],
        "mtp_loss_weight": MTP_LOSS_WEIGHT,
        "mtp_loss_position_stride": MTP_LOSS_STRIDE,
        "router_bias_update_speed": BIAS_UPDATE_SPEED if spec["family"] == "mimo_v2_flash" else None,
        "corpus": {"debian_package": CORPUS_DEB, "sha256": CORPUS_SHA256,
                   "validation_fraction": VALIDATION_FRACTION, "train_tokens": len(batches.stream)},
        "train_seconds": round(train_seconds, 1),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
        "eval": result,
    }
    extra = {"training.json": json.dumps(record, indent=2) + "\n", "TRAINING.md": training_markdown(name, record),
             "LICENSE": LICENSE_TEXT}
    export(model, tokenizer, config, out_root / name, extra)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "mimo_local" / "demo_models")
    parser.add_argument("--only", choices=list(MODELS))
    parser.add_argument("--steps", type=int, help="override the recorded step count (for smoke runs)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mimo-demo-corpus")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(SEED)

    train_books, validation_books = split_corpus(novels(fetch_corpus_deb(args.cache)))
    tokenizer = train_tokenizer(VOCAB_SIZE, [p for book in train_books for p in book])
    args.out.mkdir(parents=True, exist_ok=True)
    heldout = "\n\n".join(validation_books[-1])[:HELDOUT_CHARS].rsplit("\n\n", 1)[0] + "\n"
    (args.out / "heldout.txt").write_text(heldout)
    write_word_list(train_books, args.out)
    windows = validation_windows(tokenizer, validation_books)
    for name, spec in MODELS.items():
        if args.only and name != args.only:
            continue
        batches = Batches(tokenizer, train_books, random.Random(SEED))
        train_one(name, spec, args.steps or spec["steps"], tokenizer, batches, windows, args.out)
        add_engine_measurements(args.out / name, args.out / "heldout.txt")


if __name__ == "__main__":
    main()
