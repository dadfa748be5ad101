"""Self-generated text: the full-precision model writes its own training and calibration data.

Method (LLM-QAT, Liu et al. 2023, section 3.1, also used by OneBit): the first token of each
sequence is drawn uniformly from the vocabulary (special tokens excluded), the next
``greedy_prefix`` tokens (default 4; LLM-QAT found 3-5 best) are the model's top-1 choice, and
the rest are sampled from the model's distribution (``temperature``/``top_p``; LLM-QAT samples
from the full softmax: 1.0 / 1.0). A sequence ends at EOS or at ``seq_len`` tokens.

Generation is batched with a KV cache and seeded, and the result is cached under
``$BINARIZE_CACHE`` (else ``~/.cache/binarize``) keyed by a hash of the model files and every
setting, so a resumed or repeated conversion reuses it. Files are ``.jsonl.gz`` records of the
sampled token ``ids`` (what a conversion trains on, exactly: decoding and tokenizing again would
change them) with their decoded ``text`` beside them for people to read.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import inspect
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from binarize.errors import BinarizeError

BYTES_PER_TOKEN_ON_DISK = 8  # generous: ~4 chars of text + ids in JSON, before gzip
MAX_EMPTY_BATCHES = 8  # batches in a row that write no token before self-generation gives up


@dataclass(frozen=True)
class SelfGenConfig:
    tokens: int
    seq_len: int = 512
    batch_size: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    greedy_prefix: int = 4
    seed: int = 0

    def check(self) -> None:
        if self.tokens <= 0 or self.seq_len < 2 or self.batch_size <= 0:
            raise BinarizeError("self-generated data needs tokens > 0, seq_len >= 2 and batch size > 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.greedy_prefix < 0:
            raise BinarizeError("self-generation needs temperature >= 0, top_p in (0, 1] and greedy_prefix >= 0")


def cache_dir() -> Path:
    return Path(os.environ.get("BINARIZE_CACHE", Path.home() / ".cache" / "binarize")) / "self-data"


def model_fingerprint(src) -> str:
    """SHA-256 over the model's weight and config files (name and content of each; a GGUF: that
    file). A hub id is fingerprinted by its cached snapshot's files once downloaded, else stands for
    itself (``hub:ID``). Hashed once per process while the files' sizes and times are unchanged
    (the run identity and the self-generated text's cache key share it)."""
    path = Path(src.path)
    if not path.exists():
        path = _hub_snapshot(src.spec)
        if path is None:
            return f"hub:{src.spec}"
    files = [path / src.gguf_file] if src.gguf_file else sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json", ".gguf") and p.is_file())
    return _files_sha256(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=8)
def _files_sha256(stats: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in stats:
        h.update(Path(name).name.encode())
        with open(name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _hub_snapshot(spec: str) -> Path | None:
    """The directory of a hub model's cached snapshot (where its config.json is), if any."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(spec, "config.json")
    except Exception:  # not a repo id, no cache: the spec stands for itself
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def check_disk(folder: Path, tokens: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    need, free = tokens * BYTES_PER_TOKEN_ON_DISK, shutil.disk_usage(folder).free
    if need > free:
        raise BinarizeError(f"generating {tokens:,} tokens needs about {need / 2**30:.1f} GiB in {folder}, "
                            f"only {free / 2**30:.1f} GiB free")


def _sample(logits: torch.Tensor, temperature: float, top_p: float, g: torch.Generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest head whose mass reaches top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=g).squeeze(-1)


@torch.inference_mode()
def generate_sequences(model, tokenizer, cfg: SelfGenConfig, on_tokens=None) -> list[list[int]]:
    """Sequences of token ids (each ends at EOS or seq_len) until ``cfg.tokens`` are written."""
    from transformers import DynamicCache

    cfg.check()
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(min(vocab, len(tokenizer))) if i not in special])
    eos = tokenizer.eos_token_id
    g = torch.Generator().manual_seed(cfg.seed)
    out: list[list[int]] = []
    written = empty = 0
    # transformers >= 5.2x names the KV cache argument ``cache`` (``past_key_values`` warns there)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    while written < cfg.tokens:
        if empty >= MAX_EMPTY_BATCHES:
            raise BinarizeError(f"self-generation stopped: the model ended every sample at once (EOS right after the "
                                f"first token) in {empty} batches in a row, {written:,} of {cfg.tokens:,} tokens "
                                "written; train on other text (--data ptb, --data FILE)")
        # the last batch only as wide as the budget still needs (sequences ending at EOS may
        # leave a little over, which one more narrow batch fills)
        b = min(cfg.batch_size, max(1, -(-(cfg.tokens - written) // cfg.seq_len)))
        first = allowed[torch.randint(len(allowed), (b,), generator=g)]
        seqs, done = [first], torch.zeros(b, dtype=torch.bool)
        cache, x = DynamicCache(), first[:, None].to(device)
        for i in range(1, cfg.seq_len):
            logits = model(input_ids=x, **{cache_kw: cache}, use_cache=True).logits[:, -1].float().cpu()
            nxt = logits.argmax(-1) if i <= cfg.greedy_prefix else _sample(logits, cfg.temperature, cfg.top_p, g)
            seqs.append(nxt)
            if eos is not None:
                done |= nxt == eos
                if bool(done.all()):
                    break
            x = nxt[:, None].to(device)
        batch = torch.stack(seqs, 1).tolist()
        before = written
        for s in batch:
            if eos is not None and eos in s:
                s = s[: s.index(eos)]  # the loader puts EOS back between documents
            if len(s) > 1 and written < cfg.tokens:
                out.append(s)
                written += len(s)
                if on_tokens:
                    on_tokens(len(s))
        empty = empty + 1 if written == before else 0
    return out


def write_jsonl(path: Path, seqs: list[list[int]], tokenizer, meta: dict) -> None:
    """Atomically write sequences as .jsonl(.gz) records {"text", "ids"} (``ids``: the sampled
    tokens, which training reads; ``text``: for people) plus PATH.meta.json."""
    tmp = path.with_name(path.name + ".tmp")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(tmp, "wt", encoding="utf-8") as f:
        for s in seqs:
            f.write(json.dumps({"text": tokenizer.decode(s, skip_special_tokens=True), "ids": s}) + "\n")
    os.replace(tmp, path)
    meta_path = path.with_name(path.name + ".meta.json")
    meta_path.with_name(meta_path.name + ".tmp").write_text(json.dumps(meta, indent=2))
    os.replace(meta_path.with_name(meta_path.name + ".tmp"), meta_path)


def generate_to_file(model, tokenizer, cfg: SelfGenConfig, path: Path, model_id: str, progress: bool = True,
                     log=None) -> dict:
    """Generate, write ``path`` and return the meta record (tokens, seconds, tokens/s)."""
    check_disk(path.parent, cfg.tokens)
    start = time.perf_counter()
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("self-generating"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} tok"),
                      TextColumn("{task.fields[tps]} tok/s"),
                      TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task("gen", total=cfg.tokens, tps="-")

            def tick(n):
                bar.advance(task, n)
                done = bar.tasks[0].completed
                bar.update(task, tps=f"{done / (time.perf_counter() - start):.0f}")

            seqs = generate_sequences(model, tokenizer, cfg, tick)
    else:
        state = {"done": 0, "next": cfg.tokens // 10}

        def tick(n):  # a log line every tenth of the budget, for --no-progress log files
            state["done"] += n
            if log and state["done"] >= state["next"]:
                state["next"] += cfg.tokens // 10
                log(f"self-generated {state['done']:,}/{cfg.tokens:,} tokens, "
                    f"{state['done'] / (time.perf_counter() - start):.0f} tok/s")

        seqs = generate_sequences(model, tokenizer, cfg, tick)
    seconds = time.perf_counter() - start
    n = sum(len(s) for s in seqs)
    meta = {"model": model_id, "settings": asdict(cfg), "sequences": len(seqs), "tokens": n,
            "seconds": round(seconds, 2), "tokens_per_s": round(n / seconds, 1),
            "method": "LLM-QAT: uniform first token, top-1 prefix, then sampling"}
    write_jsonl(path, seqs, tokenizer, meta)
    if log:
        log(f"self-generated {n:,} tokens in {len(seqs)} sequences: {seconds:.0f} s, "
            f"{n / seconds:.0f} tok/s (batch {cfg.batch_size})")
    return meta


def cache_path(src, cfg: SelfGenConfig) -> Path:
    """Where the corpus of (model files, settings) is cached (it may not exist yet)."""
    key = hashlib.sha256(json.dumps({"model": model_fingerprint(src), **asdict(cfg)}, sort_keys=True).encode())
    return cache_dir() / f"{key.hexdigest()[:24]}.jsonl.gz"


def is_cached(src, cfg: SelfGenConfig) -> bool:
    path = cache_path(src, cfg)
    return path.exists() and path.with_name(path.name + ".meta.json").exists()


def cached_self_data(model, tokenizer, src, cfg: SelfGenConfig, progress: bool = True, log=None) -> tuple[Path, dict]:
    """The cached file for (model files, settings), generating it on first use."""
    path = cache_path(src, cfg)
    meta_path = path.with_name(path.name + ".meta.json")
    if path.exists() and meta_path.exists():
        if log:
            log(f"reusing self-generated data {path}")
        return path, json.loads(meta_path.read_text())
    return path, generate_to_file(model, tokenizer, cfg, path, src.spec, progress, log)
