"""Training data of a conversion: the token stream for QAT and the calibration set for BaI.

``prepare_data`` turns the recipe's ``data`` / ``calib`` specs into ``RunData`` for a Budget
(computed once by ``plan.check_job``). Self-generated text (``self``) comes from ``SelfText``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from binarize.calibration.datasets import DATASETS, local_file
from binarize.calibration.streams import (TokenBlocks, TrainStream, join_sequences, read_documents, skipped_summary,
                                          tokenize_documents)

from ..errors import BinarizeError
from ..recipe import Recipe, parse_mix
from .plan import Budget


@dataclass
class RunData:
    """The data only: ``train`` yields sequences by global index, ``calib`` is (n_calib, seq_len)
    token ids, ``info`` says where both came from (for run.json)."""

    train: TrainStream
    calib: torch.Tensor
    info: dict


def resolve_auto(spec: str) -> str:
    """``auto``: PTB train when its local file exists (the offline default), else ``self``."""
    if spec != "auto":
        return spec
    return "ptb" if local_file(DATASETS["ptb"].splits["train"]) is not None else "self"


def _n_self_blocks(spec: str, n_tokens: int, L: int) -> int:
    """Blocks of self-generated text in ``n_tokens`` of a data spec (its fraction of them)."""
    real, frac = parse_mix(spec)
    if frac == 0:
        return 0
    return round(n_tokens * frac / L) if real else math.ceil(n_tokens / L)


def _self_tokens(spec: str, n_tokens: int, L: int) -> int:
    n = _n_self_blocks(spec, n_tokens, L)
    return 0 if n == 0 else n * L + L  # one spare block: documents end mid-block


def _blocks_from(spec: str, n_tokens: int, L: int, tokenizer, self_text,
                 skipped: dict | None = None, whole: bool = False) -> tuple[TokenBlocks, str]:
    """Blocks of L tokens for a data spec; ``self+SPEC:F`` mixes F self-generated tokens with SPEC.
    Records of the source skipped for a null, empty or non-string text are counted in ``skipped``
    under the source's description. ``whole``: a pure ``self`` spec reads every document left."""
    real, frac = parse_mix(spec)
    parts, wheres = [], []
    n_self = _n_self_blocks(spec, n_tokens, L)
    if frac > 0:
        if self_text is None:
            raise BinarizeError("self-generated data needs the model (convert builds it)")
        whole = whole and not real  # all of a corpus already paid for (SelfText.whole)
        seqs, where = self_text.take(_self_tokens(spec, n_tokens, L), rest=whole)  # the sampled ids themselves
        blocks = TokenBlocks.from_stream(join_sequences(seqs, tokenizer.eos_token_id), L)
        parts.append(blocks.blocks if whole else blocks.blocks[:n_self])
        wheres.append(f"{where} ({parts[-1].shape[0]} blocks)")
    if real:
        n_real = math.ceil(n_tokens / L) - n_self if frac > 0 else None
        read = read_documents(real, max_chars=n_tokens * 8)
        docs, where = read.docs, read.where
        if read.skipped and skipped is not None:
            skipped[where] = read.skipped
        blocks = TokenBlocks.from_stream(tokenize_documents(tokenizer, docs), L)
        parts.append(blocks.blocks[:n_real] if n_real is not None else blocks.blocks)
        wheres.append(f"{where} ({parts[-1].shape[0]} blocks)" if frac > 0 else where)
    return TokenBlocks(torch.cat(parts)), " + ".join(wheres)


def prepare_data(tokenizer, recipe: Recipe, budget: Budget, self_text: "SelfText | None" = None) -> RunData:
    """Training stream and calibration set for ``budget``; ``self_text`` supplies text for ``self`` specs.
    Raises BinarizeError when a source is too short to hold out the calibration set."""
    L = recipe.seq_len
    n_seq = budget.n_sequences
    data_spec, calib_spec = resolve_auto(recipe.data), resolve_auto(recipe.calib)
    n_calib = recipe.calib_sequences if recipe.calibrates else 0
    same = calib_spec == data_spec
    skipped: dict[str, dict[str, int]] = {}
    if self_text is not None:
        if not same:  # calibration's self-generated text first, so it does not move with the budget
            self_text.reserve(_self_tokens(calib_spec, n_calib * L, L))
        self_text.reserve(_self_tokens(data_spec, n_seq * L + (n_calib * L if same else 0), L))
    if not same:
        cblocks, calib_where = _blocks_from(calib_spec, n_calib * L, L, tokenizer, self_text, skipped)
        if n_calib and len(cblocks) == 0:
            raise BinarizeError(f"calibration data {calib_where} is shorter than one sequence of {L} tokens")
        g = torch.Generator().manual_seed(recipe.seed + 17)
        calib = cblocks.blocks[torch.randperm(len(cblocks), generator=g)[:n_calib]]
    if n_seq == 0 and not same:  # --tokens 0: no training text is read (or generated)
        train_blocks, where = TokenBlocks(torch.zeros(0, L, dtype=torch.long)), "none (--tokens 0)"
    else:
        train_blocks, where = _blocks_from(data_spec, n_seq * L + (n_calib * L if same else 0), L, tokenizer,
                                           self_text, skipped, whole=self_text is not None and self_text.whole)
    if same:
        # Same source: hold its first n_calib blocks out of training, so calibration text is never
        # trained on and is the same at every budget (the head of a source does not depend on how
        # much of it a budget reads; --init-from shares one initialisation across budgets).
        if len(train_blocks) < n_calib or (n_seq and len(train_blocks) == n_calib):
            raise BinarizeError(f"{where} has {len(train_blocks)} blocks of {L} tokens, too few to hold out "
                                f"{n_calib} for calibration and train on the rest")
        calib = train_blocks.blocks[:n_calib]
        train_blocks = TokenBlocks(train_blocks.blocks[n_calib:])
        calib_where = f"{where} (first {n_calib} blocks, held out of training)"
    if recipe.blockwise_steps and calib.shape[0] < recipe.blockwise_sequences:
        raise BinarizeError(f"calibration data {calib_where} holds {calib.shape[0]} sequences of {L} tokens, fewer "
                            f"than blockwise_sequences {recipe.blockwise_sequences}")
    info = {
        "train_source": where, "calib_source": calib_where,
        "train_blocks_available": len(train_blocks), "calib_sequences": int(calib.shape[0]),
        "epochs_over_train_data": n_seq / len(train_blocks) if len(train_blocks) else None,
    }
    if skipped:  # records whose text was null, empty or not a string: counted, never trained on as "None"
        info["skipped_records"] = skipped
        if os.environ.get("RANK", "0") == "0":
            for source, counts in skipped.items():
                print(f"  note: {source}: skipped {sum(counts.values())} records whose text is not usable "
                      f"({skipped_summary(counts)})", flush=True)
    return RunData(TrainStream(train_blocks, recipe.seed, allow_empty=n_seq == 0), calib, info)


def self_gen_config(r: Recipe, needed: int):
    """The SelfGenConfig of a recipe's corpus: ``self_tokens``, else the ``needed`` tokens."""
    from binarize.calibration.selfgen import SelfGenConfig

    return SelfGenConfig(tokens=r.self_tokens or needed, seq_len=r.seq_len, batch_size=r.self_batch,
                         temperature=r.self_temperature, top_p=r.self_top_p, greedy_prefix=r.self_greedy_prefix,
                         seed=r.seed)


class SelfText:
    """Self-generated documents for prepare_data: generated (or found in the cache) once for
    everything reserved, then handed out in order, so training and calibration never share text.
    The recipe's ``self_tokens`` fixes the corpus size instead: runs that need more repeat it in
    epochs (calibration still held out), runs that need less read its start, and runs with the
    same settings share one cached file (generation costs about as much per token as a QAT step
    on a CPU, so a small corpus buys more steps for the same time).

    ``whole``: a pure ``self`` training text is all of the corpus, not only the budget's share of
    it (the ``--time`` path, whose end-to-end stage is re-planned later within ``max_epochs`` of
    the text it holds: the 30-minute run read 88 of 128 blocks generated and re-planned over them)."""

    def __init__(self, model, tokenizer, src, recipe: Recipe, progress: bool = False, log=None,
                 whole: bool = False):
        self.model, self.tokenizer, self.src, self.recipe = model, tokenizer, src, recipe
        self.progress, self.log, self.whole = progress, log, whole
        self.reserved, self.docs, self.cursor, self.path, self.meta = 0, None, 0, None, None
        self.read = {"sequences": 0, "tokens": 0}  # handed out so far: the generated ids themselves

    def reserve(self, n_tokens: int) -> None:
        self.reserved += n_tokens

    def take(self, n_tokens: int, rest: bool = False) -> tuple[list[list[int]], str]:
        """The next documents (token ids, as sampled) holding ``n_tokens`` with an EOS after each
        (``rest``: every document left, at least as many), and where they came from. A record's
        ``ids`` are used as they are; a record of an older cache file without them is tokenized
        from its ``text``."""
        import gzip
        import json

        from binarize.calibration.selfgen import cached_self_data

        if self.docs is None:
            cfg = self_gen_config(self.recipe, max(self.reserved, n_tokens))
            self.path, self.meta = cached_self_data(self.model, self.tokenizer, self.src, cfg, self.progress, self.log)
            with gzip.open(self.path, "rt", encoding="utf-8") as f:
                self.docs = [json.loads(line) for line in f]
        out, got, first = [], 0, self.cursor
        while (rest or got < n_tokens) and self.cursor < len(self.docs):
            ids = self._ids(self.docs[self.cursor], self.cursor + 1)
            out.append(ids)
            got += len(ids) + 1  # + the EOS the loader puts between documents
            self.cursor += 1
        self.read["sequences"] += len(out)
        self.read["tokens"] += sum(map(len, out))
        return out, f"self-generated {self.path} [docs {first}:{self.cursor}]"

    def _ids(self, rec, line: int) -> list[int]:
        """A record's token ids: its ``ids`` checked (ints inside the vocabulary: the model's, which
        may hold padding rows past the tokenizer's), else its text tokenized."""
        ids = rec.get("ids") if isinstance(rec, dict) else None
        if ids is None:
            text = rec.get("text") if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise BinarizeError(f"{self.path}:{line}: a self-generated record with neither ids nor text "
                                    "(delete the file to generate it again)")
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        vocab = max(len(self.tokenizer), getattr(getattr(self.model, "config", None), "vocab_size", 0) or 0)
        if not isinstance(ids, list) or not all(type(i) is int and 0 <= i < vocab for i in ids):
            raise BinarizeError(f"{self.path}:{line}: ids are not token ids of this model's vocabulary of {vocab} "
                                "(delete the file to generate it again)")
        return ids
