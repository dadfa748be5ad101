"""The training objective: next-token cross-entropy, plus the distillation KL against the frozen
original, computed either from the model's full logits or in chunks that never hold them.

``TrainLoss`` is the module the QAT loop runs (and that DDP / FSDP wrap): ``TrainLoss(x)`` with
token ids x (batch, seq) returns (loss, ce, kd). With ``chunk`` > 0 the logits exist one chunk of
positions at a time: ``ChunkedLinearLoss`` computes the loss and, in the same pass, its gradients
with respect to the final hidden states and the output head (the fused linear cross-entropy of
Liger-Kernel and of Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024,
written in PyTorch, so it runs on CPU and GPU alike). Peak memory of the loss falls from a few
(batch x seq x vocab) fp32 tensors to a few (chunk x vocab) ones; the values and gradients are
those of the full path (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import BinarizeError

IGNORE = -100  # transformers' label value for "no target"


@dataclass
class Distill:
    """Knowledge distillation from the frozen original: loss = w_ce * CE + alpha * tau^2 * KL(p_T || p_S).

    ``ce_weight`` (recipe ``distill_ce``) is 1 for CE + KL (OneBit's and BitNet Distillation's
    sum) and 0 for pure logit distillation: the teacher's distribution then is the only target.

    KL is taken per position over the full vocabulary at temperature tau (Hinton et al.; the
    tau^2 keeps its gradient scale independent of tau) and averaged over all batch x seq positions.
    Memory cost: a second full-precision copy of the model, plus, on the full-logits path, the
    teacher's logits and two log-softmaxes per micro-batch (3 x micro_batch x seq_len x vocab floats).

    ``hidden`` (recipe ``distill_hidden``) > 0 adds hidden-state distillation to the end-to-end loss:
    + hidden * mean over the model's hidden states l = 1..L of the per-token relative squared error
    ||h_S,l - h_T,l||^2 / ||h_T,l||^2 (``reconstruction_loss``, the block-wise stage's metric; the
    per-layer feature terms of BinaryMoS, arXiv 2406.12311, and LittleBit, arXiv 2506.13771). The
    states are transformers' ``hidden_states[1:]``: the outputs of blocks 0..L-2 and the final
    normed state (transformers 5 records the last block's output after the final norm). The teacher
    then runs every step, also beside a top-k cache.

    ``topk`` (recipe ``distill_topk``) > 0 distils from the teacher's k largest logits per position
    instead (the sparse target q = softmax(top-k logits / tau), zero elsewhere; KL(q || p_S)), and
    caches them per training sequence the first time the sequence is seen, so later epochs over the
    same text never run the teacher: ``cache`` maps a sequence's token bytes to (logits minus their
    maximum, fp16, (seq, k); vocabulary ids, int32, (seq, k)), 6 k bytes per token in host memory
    (k = 64: 384 B; 1M distinct tokens: 366 MiB). The first epoch costs what the full teacher costs;
    the loss is the truncated teacher's in every epoch, so epochs are comparable.
    """

    teacher: torch.nn.Module
    alpha: float
    temperature: float
    ce_weight: float = 1.0
    topk: int = 0
    hidden: float = 0.0
    cache: dict = field(default_factory=dict, repr=False)
    hits: int = 0
    misses: int = 0

    @classmethod
    def from_recipe(cls, teacher: torch.nn.Module, recipe) -> "Distill":
        """The recipe's distillation (``distill_alpha``, ``_temperature``, ``_ce``, ``_topk``, ``_hidden``)."""
        return cls(teacher, recipe.distill_alpha, recipe.distill_temperature, recipe.distill_ce, recipe.distill_topk,
                   recipe.distill_hidden)

    def kl(self, x: torch.Tensor, student_logits: torch.Tensor,
           teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """x: (batch, seq) token ids; student_logits: (batch, seq, vocab); teacher_logits: the same
        shape when already computed (else the teacher runs here). Returns tau^2 * KL, a scalar."""
        tau = self.temperature
        s_logp = torch.log_softmax(student_logits.float() / tau, dim=-1)
        if self.topk:
            idx, vals = self.sparse_targets(x, 0, teacher_logits)
            q_logp = torch.log_softmax(vals / tau, dim=-1)
            picked = s_logp.flatten(0, -2).gather(1, idx)
            return (q_logp.exp() * (q_logp - picked)).sum() / idx.shape[0] * tau * tau
        with torch.no_grad():
            if teacher_logits is None:
                teacher_logits = self.teacher(input_ids=x).logits
            t_logp = torch.log_softmax(teacher_logits.float() / tau, dim=-1)
        kl = F.kl_div(s_logp.flatten(0, -2), t_logp.flatten(0, -2), log_target=True, reduction="batchmean")
        return kl * tau * tau

    @torch.no_grad()
    def sparse_targets(self, x: torch.Tensor, chunk: int,
                       teacher_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k for every position of x (batch, seq): (ids (batch * seq, k) int64,
        logits (batch * seq, k) float32, shifted so each row's largest is 0), from the cache where the
        sequence was seen before. ``chunk`` > 0 computes missing logits that many positions at a time
        (lm_head of the final hidden states, soft-capped as the model does); 0: the model's own logits.
        ``teacher_out``: the teacher's final hidden states (chunk > 0) or logits (chunk 0) for all of
        x, where the step already ran it (hidden-state distillation), so a miss does not run it again."""
        keys = [row.cpu().numpy().tobytes() for row in x]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            xm = x[missing]
            k = min(self.topk, self.teacher.config.vocab_size)
            if chunk:
                h = (teacher_out[missing] if teacher_out is not None
                     else self.teacher.get_decoder()(input_ids=xm).last_hidden_state)
                head, cap = self.teacher.get_output_embeddings(), logit_softcap(self.teacher)
            else:
                logits = teacher_out[missing] if teacher_out is not None else self.teacher(input_ids=xm).logits
            step = chunk or x.shape[1]
            for j, i in enumerate(missing):
                parts = []
                for c in range(0, x.shape[1], step):
                    if chunk:
                        z = head(h[j, c : c + step]).float()
                        z = cap * torch.tanh(z / cap) if cap else z
                    else:
                        z = logits[j, c : c + step].float()
                    parts.append(z.topk(k, dim=-1))  # values sorted: column 0 is the row's largest
                vals = torch.cat([v for v, _ in parts])
                ids = torch.cat([ix for _, ix in parts])
                self.cache[keys[i]] = ((vals - vals[:, :1]).half().cpu(), ids.int().cpu())
        vals = torch.cat([self.cache[key][0] for key in keys]).to(x.device, torch.float32)
        ids = torch.cat([self.cache[key][1] for key in keys]).to(x.device, torch.int64)
        return ids, vals

    def cache_info(self) -> dict:
        """For run.json: k, sequences cached, lookups served from the cache and not, host MiB."""
        nbytes = sum(v.numel() * v.element_size() + i.numel() * i.element_size() for v, i in self.cache.values())
        return {"k": self.topk, "sequences": len(self.cache), "hits": self.hits, "misses": self.misses,
                "MiB": round(nbytes / 2**20, 2)}


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "relative") -> torch.Tensor:
    """Mean over tokens of ||out - target||^2 / ||target||^2 (``relative``) or the plain MSE.
    Shapes (batch, seq, hidden); a scalar. The block-wise stage's loss (blockwise.py) and the
    end-to-end hidden-state distillation (``Distill.hidden``)."""
    err = (out.float() - target.float()).pow(2)
    if kind == "mse":
        return err.mean()
    return (err.sum(-1) / target.float().pow(2).sum(-1).clamp_min(1e-12)).mean()


def hidden_distill_loss(student: tuple, teacher: tuple) -> torch.Tensor:
    """Mean over l = 1..L of ``reconstruction_loss(student[l], teacher[l])``: transformers'
    ``hidden_states`` tuples (L + 1 tensors (batch, seq, hidden), index 0 the embeddings, which
    stay full precision and are skipped). A scalar."""
    if len(student) != len(teacher) or len(student) < 2:
        raise BinarizeError(f"hidden-state distillation needs the student's and the teacher's hidden states "
                            f"(got {len(student)} and {len(teacher)})")
    return torch.stack([reconstruction_loss(s, t) for s, t in zip(student[1:], teacher[1:])]).mean()


def logit_softcap(model) -> float | None:
    """Gemma 2's final soft-capping: logits = cap * tanh(z / cap) (None: plain logits)."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def check_chunked(model, what: str = "loss_chunk > 0", remedy: str = "--set loss_chunk=0 (the full-logits loss)"
                  ) -> None:
    """The chunked path computes logits as ``lm_head(final hidden state)``, soft-capped where the
    model soft-caps them (Gemma 2); a model that changes them otherwise (Cohere's logit scale) is
    refused with one line naming ``what`` needs it and the ``remedy``."""
    cfg = model.config
    for key in ("logit_scale", "output_multiplier_scale"):
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            raise BinarizeError(f"{what} needs logits = lm_head(hidden), but {cfg.model_type} sets {key}: "
                                f"use {remedy}")
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or not hasattr(model, "get_decoder"):
        raise BinarizeError(f"{what} needs a Linear output head and a decoder ({type(model).__name__} has "
                            f"neither): use {remedy}")


class TrainLoss(torch.nn.Module):
    """(model, distillation, chunk) -> ``forward(x) = (loss, ce, kd)``, scalars; kd is None without
    distillation. ce is the mean next-token loss over batch x (seq - 1) positions (as transformers'
    ``labels=`` loss), kd the mean tau^2 * KL over batch x seq positions. ``chunk`` (recipe
    ``loss_chunk``) is the number of positions whose logits exist at once; 0: the model's own
    full-logits forward. ``backend`` (recipe ``loss_backend``, resolved by
    ``liger_loss.resolve_backend``): ``chunked`` (``ChunkedLinearLoss``) or ``liger`` (liger-kernel;
    its kd is the mean over the positions with a target). With ``Distill.hidden`` > 0 the loss
    (not ce or kd) also holds hidden * ``hidden_distill_loss`` of both models' hidden states, on
    every path. The teacher is held outside the module's
    parameters, so DDP / FSDP never synchronise or shard it."""

    def __init__(self, model: torch.nn.Module, distill: Distill | None = None, chunk: int = 0,
                 backend: str = "chunked"):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.backend = backend  # chunked: ChunkedLinearLoss; liger: liger-kernel (liger_loss.py)
        object.__setattr__(self, "distill", distill)  # not a submodule
        if chunk:
            check_chunked(model)

    def forward(self, x: torch.Tensor):
        d = self.distill
        states = d is not None and d.hidden > 0  # hidden-state distillation: both models return every state
        if not self.chunk:
            out = self.model(input_ids=x, labels=x, output_hidden_states=states)
            ce = out.loss
            if d is None:
                return ce, ce, None
            t_out = None
            if states:
                with torch.no_grad():
                    t_out = d.teacher(input_ids=x, output_hidden_states=True)
            kd = d.kl(x, out.logits, None if t_out is None else t_out.logits)
            loss = d.ce_weight * ce + d.alpha * kd
            if states:
                loss = loss + d.hidden * hidden_distill_loss(out.hidden_states, t_out.hidden_states)
            return loss, ce, kd
        out = self.model.get_decoder()(input_ids=x, output_hidden_states=states)
        h = out.last_hidden_state.flatten(0, 1)  # (batch * seq, hidden)
        head = self.model.get_output_embeddings()
        targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], IGNORE)], dim=1).flatten()
        teacher_h = t_head = sparse = t_out = None
        if states or (d is not None and not d.topk):
            with torch.no_grad():
                t_out = d.teacher.get_decoder()(input_ids=x, output_hidden_states=states)
        if d is not None and d.topk:
            sparse = d.sparse_targets(x, self.chunk, None if t_out is None else t_out.last_hidden_state)
        elif d is not None:
            teacher_h = t_out.last_hidden_state.flatten(0, 1)
            t_head = d.teacher.get_output_embeddings()
        weights = (d.ce_weight, d.alpha, d.temperature) if d is not None else (1.0, 0.0, 1.0)
        weights = (*weights, logit_softcap(self.model) or 0.0, (logit_softcap(d.teacher) or 0.0) if d else 0.0)
        if self.backend == "liger":
            from .liger_loss import liger_loss

            if sparse is not None:  # resolve_backend keeps distill_topk on the chunked path
                raise BinarizeError("loss_backend=liger has no form for the teacher's top-k logits (distill_topk)")
            loss, ce, kd = liger_loss(h, head, targets, teacher_h, t_head, weights, self.chunk, IGNORE)
        else:
            loss, ce, kd = ChunkedLinearLoss.apply(h, head.weight, head.bias, targets, teacher_h,
                                                   None if t_head is None else t_head.weight,
                                                   None if t_head is None else t_head.bias, sparse, weights, self.chunk)
        if states:
            loss = loss + d.hidden * hidden_distill_loss(out.hidden_states, t_out.hidden_states)
        return loss, ce, (kd if d is not None else None)


class ChunkedLinearLoss(torch.autograd.Function):
    """loss = w_ce * CE(h W^T + b, targets) + alpha * tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)).

    h: (N, hidden) final hidden states; W: (vocab, hidden), b: (vocab,) or None; targets: (N,)
    with -100 for no target; teacher_h / teacher W, b: the teacher's, or None; ``sparse``: instead of
    them, the teacher's top-k (ids (N, k), logits (N, k); ``Distill.sparse_targets``), whose
    softmax q replaces p_T (gradient tau * (softmax(z / tau) - q) / N). CE is the mean over
    the N' rows with a target, KL the mean over all N rows. Forward walks the rows ``chunk`` at a
    time, computing each chunk's logits, its loss terms and the loss's gradient with respect to h
    and W (and b), which backward only scales: d CE / d z = (softmax(z) - onehot) / N' and
    d (tau^2 KL) / d z = tau * (softmax(z / tau) - p_T) / N. A chunk with no target skips the
    CE's softmax (the block-wise head KL: 1.56 -> 1.22 s per step of 4 x 256 tokens on the default
    model). Returns (loss, ce, kd); only loss carries a gradient.
    """

    @staticmethod
    def forward(ctx, h, w, b, targets, teacher_h, t_w, t_b, sparse, weights, chunk):
        w_ce, alpha, tau, cap, t_cap = weights
        n = h.shape[0]
        n_ce = max(1, int((targets != IGNORE).sum()))
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = b is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if need_b else None
        ce_sum = h.new_zeros((), dtype=torch.float32)
        kd_sum = h.new_zeros((), dtype=torch.float32)
        for i in range(0, n, chunk):
            hc = h[i : i + chunk]
            z = F.linear(hc, w, b).float()  # (c, vocab)
            if cap:  # Gemma 2: z = cap * tanh(z0 / cap), dz / dz0 = 1 - (z / cap)^2
                z = cap * torch.tanh(z / cap)
                dcap = 1.0 - (z / cap) ** 2
            tc = targets[i : i + chunk]
            valid = tc != IGNORE
            g = None  # d loss / d z of this chunk
            if bool(valid.any()):  # no CE work where no row has a target (the block-wise head KL)
                logp = torch.log_softmax(z, dim=-1)
                safe = tc.clamp_min(0)
                ce_sum += -(logp.gather(1, safe[:, None])[:, 0] * valid).sum()
                g = logp.exp_()  # softmax(z); logp is not needed any more
                g[valid.nonzero()[:, 0], safe[valid]] -= 1.0
                g *= (w_ce / n_ce) * valid[:, None]
                del logp
            if teacher_h is not None and alpha:
                zt = F.linear(teacher_h[i : i + chunk], t_w, t_b).float()
                if t_cap:
                    zt = t_cap * torch.tanh(zt / t_cap)
                t_logp = torch.log_softmax(zt / tau if tau != 1 else zt, dim=-1)
                s_logp = torch.log_softmax(z / tau if tau != 1 else z, dim=-1)
                kd_sum += F.kl_div(s_logp, t_logp, reduction="sum", log_target=True) * (tau * tau)
                gk = s_logp.exp_().sub_(t_logp.exp_()).mul_(alpha * tau / n)
                g = gk if g is None else g.add_(gk)
                del zt, t_logp, s_logp
            elif sparse is not None and alpha:
                ids, q_logp = sparse[0][i : i + chunk], torch.log_softmax(sparse[1][i : i + chunk] / tau, dim=-1)
                s_logp = torch.log_softmax(z / tau, dim=-1)
                kd_sum += (q_logp.exp() * (q_logp - s_logp.gather(1, ids))).sum() * tau * tau
                gk = s_logp.exp_().mul_(alpha * tau / n)
                gk.scatter_add_(1, ids, q_logp.exp_() * (-alpha * tau / n))
                g = gk if g is None else g.add_(gk)
            if g is None:  # neither a target nor a teacher in this chunk: no gradient
                g = torch.zeros_like(z)
            if cap:
                g *= dcap
                del dcap
            del z
            g = g.to(h.dtype)
            if need_h:
                grad_h[i : i + chunk] = g @ w.to(h.dtype)
            if need_w:
                grad_w += g.float().T @ hc.float()
            if need_b:
                grad_b += g.float().sum(0)
        ce, kd = ce_sum / n_ce, kd_sum / n
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (w.dtype, None if b is None else b.dtype)
        ctx.mark_non_differentiable(ce, kd)
        return w_ce * ce + alpha * kd, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_loss).to(w_dtype),
                None if grad_b is None else (grad_b * grad_loss).to(b_dtype), None, None, None, None, None, None, None)
