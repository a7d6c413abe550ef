"""Choose a site's support by the model's loss, not the layer's err.

The solvers minimize a site's reconstruction error err(S), which weighs
every direction of the site's output alike. For attention heads that
ranking carries little of what the model's loss sees: on SmolLM2's layer 0
at 30%, the 27 feasible head supports' err has a Spearman correlation of
-0.10 with the model's perplexity (`osscar-opt bench-supports`).

Here the change of the causal LM's next-token loss when a site's output
changes by e_t (token t) is estimated to second order, with the gradients
g_t of the mean calibration loss L at the site's output (one backward pass
over the calibration windows on the model before pruning):

    dL(S) ~ sum_t g_t' e_t + (T / 2) sum_t (g_t' e_t)^2,   T = loss tokens,

(the second term: the empirical Fisher of the mean of T token losses), and,
with e_t = W_S' x_t - y_t for the site's refit weights W_S on its inputs x_t
and its target y_t, and g independent of x in the second term (K-FAC):

    dL(S) ~ tr(W_S' C) + (T / 2) tr(F D' H D) + const,
    C = sum_t x_t g_t',  F = sum_t g_t g_t',  D = W_S - W_target,

H the instance's Gram matrix. Only the support S changes with the choice,
so the refit weights stay those of the instance (they are what gets
deployed) and only the pick among supports follows the loss. With few
feasible supports (SmolLM2's heads: at most 27) every one is scored; with
more, best-improvement swaps run from the solver's support.

Measured on SmolLM2 at 30% (`osscar-opt bench-supports`, one site of the
dense model): Spearman +0.23 (layer 0) and +0.56 (layer 13) with the
model's perplexity, against -0.10 and -0.09 for err; its pick ranks 2nd of
the 27 supports at both layers. Over the whole model (`bench-prune
--select loss`) the perplexity is higher than with the solver's supports
(17.98 against 16.61 at 20%, 18.74 against 17.68 at 30%), so apply's
default stays select="err".

`HeldOut` scores a model on held-out inputs for apply(select="validation"),
which keeps each of OSSCAR's local-search moves only where that score
agrees (see `osscar_opt.apply`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .data import DataError
from .errors import PruneError
from .evaluation import next_token_loss_sum, scoring_batch
from .extract import _Stop, _to, no_cache
from .evaluate import deployed, n_supports, supports
from .instance import Instance

MAX_ENUMERATE = 512  # score every feasible support up to this many, else swap from the solver's


@dataclass
class LossCurvature:
    """The loss gradients seen by one consumer module, summed over calibration
    tokens: C = sum_t x_t g_t' (inputs x rows, outputs g columns), F = sum_t g_t g_t',
    with g the gradient of the mean loss over `tokens` loss tokens."""

    C: np.ndarray  # (d_in, d_out) float64
    F: np.ndarray  # (d_out, d_out) float64
    tokens: int

    def estimate(self, instance: Instance, weights: np.ndarray) -> float:
        """Estimated change of the mean calibration loss when the site's
        output moves from its target to that of `weights` (d_in x d_out)."""
        if weights.shape != self.C.shape:
            raise DataError(f"the loss gradients were taken at shape {self.C.shape}, the site's weights have shape "
                            f"{weights.shape}: the consumer changed between the backward pass and the solve")
        D = weights - instance.W
        first = float(np.einsum("ij,ij->", D, self.C))
        second = 0.5 * self.tokens * float(np.einsum("ij,ij->", instance.H @ D, D @ self.F))
        return first + second


class HeldOut:
    """A model's score on held-out inputs, lower is better: a causal LM's mean
    next-token loss, or an encoder's 1 - mean cosine similarity of its
    mean-pooled embeddings to those of the model first scored (the dense
    one). `inputs`: a `Calibration` ((n, seq_len) ids, and for encoders
    their attention mask); `batch_size` windows at a time (default
    `evaluation.scoring_batch` on the device first scored on, then kept).

    Scoring a pruned model again and again while its first blocks no longer
    change (apply(select="validation") checks sites in block order) need not
    rerun them: `record(model, blocks)` keeps the inputs' outputs of the last
    of `blocks` (the model's first k), and `__call__(..., skip=blocks)` then
    runs only the blocks after them, each skipped block returning the
    recorded output. The score is the full pass's: the later blocks see the
    same inputs. A later `record` with more blocks carries on from the
    recorded ones; `forget()` drops them (call it when one of them changes)."""

    def __init__(self, inputs: Any, encoder: bool, batch_size: int | None = None):
        self.ids = inputs.input_ids
        self.mask = getattr(inputs, "attention_mask", None)
        self.encoder, self.batch_size = encoder, batch_size
        self.reference: torch.Tensor | None = None
        self.recorded: list = []  # per batch, the output of the last of the first `n_recorded` blocks (on the CPU)
        self.n_recorded = 0
        if not encoder and self.ids.shape[1] < 2:
            raise DataError(f"validation windows of a causal LM need at least 2 tokens, got shape "
                            f"{tuple(self.ids.shape)}")

    def forget(self) -> None:
        self.recorded, self.n_recorded = [], 0

    def _batches(self, dev: torch.device):
        if self.batch_size is None:  # fixed at first use: recorded outputs follow the batches
            self.batch_size = scoring_batch(self.ids.shape[1], dev)
        for a in range(0, self.ids.shape[0], self.batch_size):
            yield (self.ids[a : a + self.batch_size].to(dev),
                   None if self.mask is None else self.mask[a : a + self.batch_size].to(dev))

    def _forward(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> Any:
        return model(input_ids=ids, attention_mask=mask, **no_cache(model))

    @contextlib.contextmanager
    def _skipping(self, blocks: Sequence[nn.Module], dev: torch.device):
        """Blocks `blocks` (the model's first ones, as recorded) return the
        recorded output of the current batch instead of running; the batch
        advances with each call of the first."""
        if len(blocks) != self.n_recorded:
            raise PruneError(f"{len(blocks)} blocks to skip, but the held-out outputs of {self.n_recorded} are "
                             "recorded: call record() with those blocks first")
        if not blocks:
            yield
            return
        state = {"batch": -1, "out": None}

        def first(*args, **kwargs):
            state["batch"] += 1
            state["out"] = _to(self.recorded[state["batch"]], dev, copy=True)  # a later block may write in place
            return state["out"]

        def rest(*args, **kwargs):
            return state["out"]

        for j, block in enumerate(blocks):
            block.forward = first if j == 0 else rest  # the instance attribute shadows the class's forward
        try:
            yield
        finally:
            for block in blocks:
                block.__dict__.pop("forward", None)

    def record(self, model: nn.Module, blocks: Sequence[nn.Module], device: Any = None) -> None:
        """Record the held-out outputs of the last of `blocks` (the model's
        first blocks, as they are now and will stay while skipped), running
        only those after the ones already recorded."""
        if len(blocks) == self.n_recorded:
            return
        if len(blocks) < self.n_recorded:
            self.forget()
        if not blocks:
            return
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        outputs = []

        def grab(module, args, output):
            outputs.append(_to(output, "cpu"))
            raise _Stop

        handle = blocks[-1].register_forward_hook(grab)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self._skipping(blocks[: self.n_recorded], dev):
                for ids, mask in self._batches(dev):
                    try:
                        self._forward(model, ids, mask)
                    except _Stop:
                        pass
        finally:
            handle.remove()
            model.train(was_training)
        self.recorded, self.n_recorded = outputs, len(blocks)

    def __call__(self, model: nn.Module, device: Any = None, skip: Sequence[nn.Module] = ()) -> float:
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        total, count, pooled = 0.0, 0, []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self._skipping(skip, dev):
                for ids, mask in self._batches(dev):
                    out = self._forward(model, ids, mask)
                    if self.encoder:
                        hidden = getattr(out, "last_hidden_state", None)
                        if hidden is None:
                            raise PruneError(f"{type(model).__name__} gives no last_hidden_state: held-out "
                                             "scoring of an encoder compares its mean-pooled embeddings; use "
                                             "select='err'")
                        m = (torch.ones(ids.shape, device=dev) if mask is None else mask).unsqueeze(-1)
                        m = m.to(hidden.dtype)
                        p = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
                        pooled.append(nn.functional.normalize(p.double(), dim=-1).cpu())
                        continue
                    logits = getattr(out, "logits", None)
                    if logits is None or logits.dim() != 3:
                        raise PruneError(f"{type(model).__name__} gives no next-token logits: choosing supports "
                                         "by a held-out loss needs a causal LM; use select='err'")
                    loss, n = next_token_loss_sum(logits, ids, mask)
                    total, count = total + float(loss), count + n
        finally:
            model.train(was_training)
        if self.encoder:
            emb = torch.cat(pooled)
            if self.reference is None:
                self.reference = emb
            return float(1.0 - (emb * self.reference).sum(1).mean())
        if count == 0:
            raise DataError("the validation windows hold no next-token pairs: give windows of 2 tokens or more")
        return total / count


def loss_curvature(model: nn.Module, consumers: Sequence[str], batches: Any, device: Any = None) -> dict[str, LossCurvature]:
    """One forward and backward pass of the causal LM `model` over the
    calibration `batches` (token-id tensors, or dicts with input_ids and an
    attention_mask), gathering C and F at each consumer module (a Linear, or
    transformers' Conv1D). The parameters take no gradient and the model is
    left as it was."""
    modules = dict(model.named_modules())
    for name in consumers:
        if name not in modules:
            raise PruneError(f"no module {name!r} in the model: the loss gradients need the site's consumer")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    sums: dict[str, list] = {n: [0.0, 0.0] for n in consumers}
    held: dict[str, list] = {n: [] for n in consumers}

    def hook(name):
        def grab(module, args, output):
            leaf = output.detach().requires_grad_(True)  # the gradient stops here: no parameter needs one
            held[name].append((args[0].detach(), leaf))
            return leaf
        return grab

    handles = [modules[n].register_forward_hook(hook(n)) for n in consumers]
    tokens, was_training = 0, model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        for p, _ in flags:  # the backward pass stops at the consumers' outputs
            p.requires_grad_(False)
        batches = [(b["input_ids"], b.get("attention_mask")) if isinstance(b, dict) else (b, None) for b in batches]
        # the loss tokens of all batches: the gradients are those of their mean
        total = sum(int(ids[:, 1:].numel() if mask is None else (mask[:, 1:] != 0).sum()) for ids, mask in batches)
        if total == 0:
            raise DataError("the calibration windows hold no next-token pairs: give windows of 2 tokens or more")
        for ids, mask in batches:
            ids = ids.to(dev)
            mask = mask.to(dev) if mask is not None else None
            with torch.enable_grad():
                logits = getattr(model(input_ids=ids, attention_mask=mask), "logits", None)
                if logits is None or logits.dim() != 3:
                    raise PruneError(f"{type(model).__name__} gives no next-token logits: choosing supports by the "
                                     "loss needs a causal LM; use select='err'")
                loss, count = next_token_loss_sum(logits, ids, mask)
                del logits
                if count:
                    (loss / total).backward()
            tokens += count
            for name in consumers:
                for x, leaf in held[name]:
                    if leaf.grad is None:
                        continue
                    g = leaf.grad.reshape(-1, leaf.shape[-1]).double()
                    xs = x.reshape(-1, x.shape[-1]).double()
                    sums[name][0] = sums[name][0] + (xs.T @ g).cpu()
                    sums[name][1] = sums[name][1] + (g.T @ g).cpu()
                held[name].clear()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    out = {}
    for name in consumers:
        C, F = sums[name]
        if not isinstance(C, torch.Tensor):
            raise PruneError(f"no loss gradient reached {name}: the model's loss does not depend on that module")
        out[name] = LossCurvature(C.numpy(), F.numpy(), tokens)
    return out


def _swaps(instance: Instance, S: tuple[int, ...]):
    """Supports one in-part swap away from S."""
    kept = set(S)
    parts = instance.partition.parts if instance.partition is not None else np.zeros(instance.n_groups, dtype=np.int64)
    for out_g in S:
        for in_g in range(instance.n_groups):
            if in_g not in kept and parts[in_g] == parts[out_g]:
                yield tuple(sorted(kept - {out_g} | {in_g}))


@dataclass
class Choice:
    keep: np.ndarray  # the chosen support (sorted group ids)
    weights: np.ndarray  # its deployed weights (the refit, or W_hat on it without refit)
    err: float  # their err
    estimate: float  # its estimated loss change
    start_estimate: float  # that of the solver's support
    scored: int  # supports scored
    method: str  # "all" or "swaps"


def choose_by_loss(instance: Instance, start: Sequence[int], curvature: LossCurvature, refits: bool = True,
                   max_enumerate: int = MAX_ENUMERATE, device: Any = None) -> Choice:
    """The feasible support with the lowest estimated loss change: every one
    when there are at most `max_enumerate`, else the best-improvement swap
    local optimum from `start` (the solver's support). Each support is scored
    with the weights it would deploy: its refit, or (refits=False, for
    methods that deploy W_hat unrefit) the target's rows on it. Ties keep the
    solver's support."""
    cache: dict[tuple[int, ...], tuple[float, np.ndarray, float]] = {}

    def score(S: tuple[int, ...]) -> float:
        if S not in cache:
            _, weights, err = deployed(instance, S, refits, device=device)
            cache[S] = (curvature.estimate(instance, weights), weights, err)
        return cache[S][0]

    S0 = tuple(sorted(int(g) for g in start))
    best, best_v = S0, score(S0)
    if n_supports(instance) <= max_enumerate:
        method = "all"
        for S in supports(instance):
            v = score(S)
            if v < best_v:
                best, best_v = S, v
    else:
        method = "swaps"
        while True:
            step = min(((score(S), S) for S in _swaps(instance, best)), default=(best_v, best))
            if step[0] >= best_v:
                break
            best_v, best = step
    _, weights, err = cache[best]
    return Choice(np.asarray(best, dtype=np.int64), weights, float(err), best_v, cache[S0][0], len(cache), method)
