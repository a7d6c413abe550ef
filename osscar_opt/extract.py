"""Extraction: real pruning problems from a model and calibration data.

Forward hooks on the consumer modules accumulate X'X in float64 batch by
batch (memory constant in the number of tokens, the SparseGPT recipe), then
every site becomes an `Instance` with

    H = X'X/n + damping * mean(diag(X'X/n)) I,   W_hat = the consumer's weight.

`extract` uses the dense model's activations. The model driver
(`osscar_opt.apply`) prunes sequentially with the same `GramHooks` and
`site_instance`, block by block, so both share one code path.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .adapters import Adapter, Site, adapter_for, expert_sites, experts_layout, input_rows, is_experts, site_weight
from .data import Calibration, DataError
from .instance import DAMPING, Instance, damped_gram
from .placement import placed


def masked_rows(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A module's input (or a hidden state) as rows, padded tokens left out."""
    if mask is not None:
        keep = mask.to(x.device).bool()
        if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[keep]
        if x.dim() == 2 and x.shape[0] == mask.numel():  # (batch x tokens) rows, e.g. OPT's FFN input
            return x[keep.reshape(-1)]
    return input_rows(module, x)


def on_state(model: nn.Module, point: tuple[str, str], fn) -> Any:
    """Call fn(tensor) with the hidden state at `point`: (path, "input") the
    first input of that module, (path, "output") its output (first element of
    a tuple). Returns the hook handle."""
    path, kind = point
    module = model.get_submodule(path)
    if kind == "input":
        return module.register_forward_pre_hook(lambda m, args: fn(m, args[0]))
    return module.register_forward_hook(lambda m, args, out: fn(m, out[0] if isinstance(out, (tuple, list)) else out))


class _Hooks:
    """Forward hooks removed on `remove()` or at the end of a `with` block."""

    _handles: list

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class GramHooks(_Hooks):
    """Accumulate X'X (float64) of the inputs of a set of modules.

    deltas: {consumer: (point, rows)}: also accumulate X'(R - S) (for `correction`),
        with S the hidden state at `point` (see `on_state`) in this run and R
        the rows recorded at the same point and tokens in another run (the
        dense model's, by `StateRecorder`), one entry per call in call order.
        Tokens whose R or S is more than `outlier_factor` times its batch's
        median norm are left out of X'(R - S): attention-sink tokens with
        massive activations (SmolLM2's first token: ~150x the median from
        layer 12 on) would otherwise dominate the fit with a handful of
        samples, and the fit then fails on new text (60% pruning: perplexity
        17.6 on the calibration windows, 177 on held-out ones). Both states
        count: the model being pruned can have massive tokens the dense one
        lacks (SmolLM2 at 60% with OSSCAR, layer 11's neurons: validated
        gain 21306 against 74 with them left out; the correction fitted to
        them raised the error at 34 of the 36 later sites, perplexity 40.2
        against 37.5).
    """

    outlier_factor = 10.0
    outliers = "dense or pruned"  # whose massive tokens are left out (reports name the rule; once "dense" alone)

    def __init__(self, model: nn.Module, consumers: Iterable[str], device: Any = None,
                 deltas: dict[str, tuple[tuple[str, str], list[torch.Tensor]]] | None = None, store: Any = None):
        self.model = model
        self.device = None if device is None else torch.device(device)
        # where the plain sums are kept, when not where they are computed: many layers' Gram
        # matrices at once on the CPU while their products run on the GPU
        self.store = None if store is None else torch.device(store)
        self.sums: dict[str, torch.Tensor] = {}
        self.cross_sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        # the same sums over the first half of each batch's rows (one fold of `correction`)
        self.half_sums: dict[str, torch.Tensor] = {}
        self.half_cross: dict[str, torch.Tensor] = {}
        self.half_counts: dict[str, int] = {}
        self._last: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._handles = []
        # (batch, tokens) mask of the current batch: padded tokens stay out of X'X
        self.mask: torch.Tensor | None = None
        for name in dict.fromkeys(consumers):
            module = model.get_submodule(name)
            if is_experts(module):  # one Gram matrix per expert, under f"{name}[{e}]"
                if name in (deltas or {}):
                    raise DataError(f"{name}: stacked experts take layer targets, not a dense-target correction")
                self._handles.append(module.register_forward_hook(self._expert_hook(name), with_kwargs=True))
                continue
            self._handles.append(module.register_forward_hook(self._hook(name, name in (deltas or {}))))
        for name, (point, rows) in (deltas or {}).items():
            self._handles.append(on_state(model, point, self._delta_hook(name, rows)))

    def _hook(self, name: str, keep_rows: bool):
        def hook(module, args, output):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            rows = masked_rows(module, x.detach(), self.mask)
            dev = self.device or rows.device
            rows = rows.to(dev, torch.float64)
            acc = self.sums.get(name)
            if acc is None:
                acc = self.sums[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64,
                                                    device=dev if keep_rows or self.store is None else self.store)
                self.counts[name] = 0
            if acc.device == rows.device:
                acc.addmm_(rows.T, rows)
            else:
                acc.add_((rows.T @ rows).to(acc.device))
            self.counts[name] += rows.shape[0]
            if keep_rows:
                self._last[name] = rows
                half = rows[: rows.shape[0] // 2]
                if name not in self.half_sums:
                    self.half_sums[name] = torch.zeros_like(acc)
                    self.half_counts[name] = 0
                self.half_sums[name].addmm_(half.T, half)
                self.half_counts[name] += half.shape[0]

        return hook

    def _expert_hook(self, name: str):
        """Each expert's input rows: the neuron activations act(gate) * up of
        the tokens routed to it, times their routing weights (the factor the
        expert's output is added with), so X_e'X_e weighs each token as the
        MoE block does. Computed again from the experts' own weights; padded
        tokens left out."""
        def hook(module, args, kwargs, output):
            given = dict(zip(("hidden_states", "top_k_index", "top_k_weights"), args), **kwargs)
            x, index, weights = (given.get(k) for k in ("hidden_states", "top_k_index", "top_k_weights"))
            if not all(isinstance(t, torch.Tensor) for t in (x, index, weights)):
                raise DataError(f"{name} was called without (hidden_states, top_k_index, top_k_weights): "
                                "this experts module is not supported")
            x, index, weights = x.detach(), index.detach(), weights.detach()
            real = None
            if self.mask is not None and self.mask.numel() == x.shape[0]:
                real = self.mask.to(x.device).reshape(-1).bool()
            dev = self.device or x.device
            layout = experts_layout(module)
            n_experts, n = layout.experts, layout.neurons
            gate_fn = getattr(module, "_apply_gate", None)
            for e in range(n_experts):
                key = f"{name}[{e}]"
                if key not in self.sums:
                    self.sums[key] = torch.zeros(n, n, dtype=torch.float64, device=self.store or dev)
                    self.counts[key] = 0
                token, slot = torch.where(index == e)
                if real is not None:
                    token, slot = token[real[token]], slot[real[token]]
                if token.numel() == 0:
                    continue
                w = module.gate_up_proj[e].detach()
                gate_up = x[token] @ w if layout.transposed else nn.functional.linear(x[token], w)
                if layout.bias:
                    gate_up = gate_up + module.gate_up_proj_bias[e].detach()
                if callable(gate_fn):  # the experts' own gating (gpt-oss: interleaved, clamped)
                    act = gate_fn(gate_up)
                else:
                    gate, up = (gate_up[..., ::2], gate_up[..., 1::2]) if layout.interleaved else gate_up.chunk(2, -1)
                    act = module.act_fn(gate) * up
                rows = (act * weights[token, slot, None]).to(dev, torch.float64)
                acc = self.sums[key]
                if acc.device == rows.device:
                    acc.addmm_(rows.T, rows)
                else:
                    acc.add_((rows.T @ rows).to(acc.device))
                self.counts[key] += rows.shape[0]

        return hook

    def _delta_hook(self, name: str, recorded: list[torch.Tensor]):
        def hook(module, state):
            rows = self._last.pop(name, None)
            if rows is None:
                raise DataError(f"the hidden state after {name} was reached without running {name}")
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            if call >= len(recorded):
                raise DataError(f"{name}: more batches than were recorded in the dense model: run both on the "
                                "same calibration")
            here = masked_rows(module, state.detach(), self.mask).to(rows.device, torch.float64)
            dense = recorded[call].to(rows.device, torch.float64)
            usual = self._ordinary(dense) & self._ordinary(here)  # massive in neither model
            usual = usual.to(torch.float64)[:, None]
            delta = (dense - here) * usual
            if delta.shape[0] != rows.shape[0]:
                raise DataError(f"{name}: {rows.shape[0]} input rows but {delta.shape[0]} hidden-state rows "
                                "in the same batch")
            acc = self.cross_sums.get(name)
            if acc is None:
                acc = self.cross_sums[name] = torch.zeros(rows.shape[1], delta.shape[1], dtype=torch.float64,
                                                          device=rows.device)
                self.half_cross[name] = torch.zeros_like(acc)
            acc.addmm_(rows.T, delta)
            h = rows.shape[0] // 2
            self.half_cross[name].addmm_(rows[:h].T, delta[:h])

        return hook

    def _ordinary(self, state: torch.Tensor) -> torch.Tensor:
        """Rows whose norm is at most outlier_factor x the batch's median norm."""
        norms = torch.linalg.vector_norm(state, dim=1)
        return norms <= self.outlier_factor * norms.median()

    def correction(self, name: str, ridge: float | None = None) -> tuple[np.ndarray, dict]:
        """The dense-target correction of `name`'s weights (`fit_correction`;
        its two folds are the first and second half of every batch's rows)."""
        if name not in self.cross_sums or self.counts.get(name, 0) == 0:
            raise DataError(f"no hidden state after {name} was seen: the calibration data never ran through it")
        n, n0 = self.counts[name], self.half_counts.get(name, 0)
        G, C = self.sums[name] / n, self.cross_sums[name] / n
        G = 0.5 * (G + G.T)
        folds = None
        if ridge is None:
            if n0 == 0 or n - n0 == 0:
                raise DataError(f"{name}: too few calibration rows to validate the dense-target correction: "
                                "give more windows, or a fixed target_damping")
            S, S0 = self.sums[name], self.half_sums[name]
            X, X0 = self.cross_sums[name], self.half_cross[name]
            folds = ((S0 / n0, X0 / n0), ((S - S0) / (n - n0), (X - X0) / (n - n0)))
        c, info = fit_correction(G, C, ridge, folds)
        return c.cpu().numpy(), info

    def gram(self, name: str) -> np.ndarray:
        """X'X/n as a float64 numpy array."""
        if name not in self.sums or self.counts[name] == 0:
            raise DataError(f"no activations reached {name}: the calibration data never ran through it")
        g = (self.sums[name] / self.counts[name]).cpu().numpy()
        return 0.5 * (g + g.T)

    def samples(self, name: str) -> int:
        return self.counts.get(name, 0)

    def site_stats(self, site: Site) -> list[tuple[np.ndarray, int]]:
        """(X'X/n, n) of each site of `expert_sites(site)`: the consumer's
        own, or one per expert. An expert no calibration token was routed to
        gets the identity (its neurons are then chosen by their weights alone)."""
        views = expert_sites(site)
        if len(views) == 1 and "expert" not in views[0].extra:
            return [(self.gram(site.consumer), self.samples(site.consumer))]
        out = []
        for view in views:
            key = f"{site.consumer}[{view.extra['expert']}]"
            if key not in self.sums:
                raise DataError(f"no activations reached {site.consumer}: the calibration data never ran through it")
            n = self.counts[key]
            out.append((self.gram(key) if n else np.eye(view.n_groups * view.group_size), n))
        return out


CORRECTION_RIDGES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # the ridges `fit_correction` chooses from


def _ridge_solve(G: torch.Tensor, C: torch.Tensor, ridge: float) -> torch.Tensor:
    A = G.clone()
    A.diagonal().add_(ridge * G.diagonal().mean())
    return torch.linalg.solve(A, C)


def fit_correction(G: torch.Tensor, C: torch.Tensor, ridge: float | None = None,
                   folds: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[torch.Tensor, dict]:
    """The correction c of a site's target weights that fits the residual gap.

    G = X'X/n and C = X'(R - S)/n (float64): c = a (G + mu m I)^-1 C, with
    m the mean diagonal of G. ridge: a fixed mu, and a = 1. None: mu from
    `CORRECTION_RIDGES` and the shrinkage a in [0, 1] that predict the gap
    best across the two `folds` ((G_f, C_f) of two disjoint halves of the
    rows): fitted on one fold, scored on the other by how much it lowers
    that fold's squared gap, tr(2 a c'C_g - a^2 c'G_g c), both ways. With
    few rows per input the full correction follows the noise of the
    calibration tokens (SmolLM2 at 60%: perplexity 65 with a fixed ridge
    0.1, 51 without a correction, 40 validated); a = 0 (no correction, the layer's own output as target)
    where no ridge predicts the other fold's gap at all.
    """
    if ridge is not None:
        return _ridge_solve(G, C, ridge), {"ridge": ridge, "shrink": 1.0}
    if folds is None or len(folds) != 2:
        raise DataError("a validated dense-target correction needs two folds of the calibration rows")
    num = torch.zeros(len(CORRECTION_RIDGES), dtype=torch.float64)
    den = torch.zeros_like(num)
    for (Gf, Cf), (Gg, Cg) in (folds, folds[::-1]):
        # in G_f's eigenbasis, c = V D y with y = V'C_f and D = diag(1 / (e + mu m)), so
        # tr(c'C_g) = d'(rows of y * V'C_g) and tr(c'G_g c) = d'(V'G_g V * y y')d: once per fold
        e, V = torch.linalg.eigh(0.5 * (Gf + Gf.T))
        y = V.T @ Cf
        along = (y * (V.T @ Cg)).sum(dim=1)
        K = (V.T @ Gg @ V).mul_(y @ y.T)
        scale = Gf.diagonal().mean()
        for i, mu in enumerate(CORRECTION_RIDGES):
            d = 1.0 / (e + mu * scale).clamp_min(torch.finfo(e.dtype).tiny)
            num[i] += (d @ along).cpu()  # tr(c'C_g)
            den[i] += (d @ K @ d).cpu()  # tr(c'G_g c)
    shrink = (num / den.clamp_min(torch.finfo(den.dtype).tiny)).clamp(0.0, 1.0)
    gain = 2 * shrink * num - shrink ** 2 * den
    best = int(torch.argmax(gain))
    mu, a = CORRECTION_RIDGES[best], float(shrink[best])
    info = {"ridge": mu, "shrink": a, "gain": float(gain[best])}
    if not a > 0.0:
        return torch.zeros_like(C), info
    return a * _ridge_solve(G, C, mu), info


class StateRecorder(_Hooks):
    """Record the hidden state at some points (see `on_state`) as float32 rows
    on the CPU, one entry per call, padded tokens left out (`mask`)."""

    def __init__(self, model: nn.Module, points: dict[str, tuple[str, str]]):
        self.rows: dict[str, list[torch.Tensor]] = {key: [] for key in points}
        self.mask: torch.Tensor | None = None
        self._handles = [on_state(model, point, self._hook(key)) for key, point in points.items()]

    def _hook(self, key: str):
        def hook(module, state):
            self.rows[key].append(masked_rows(module, state.detach(), self.mask).to("cpu", torch.float32))

        return hook


def keep_count(site: Site, keep: float | int) -> tuple[int, list[int] | None]:
    """Groups kept (and the per-part budget) for a keep fraction or count."""
    p = site.n_groups
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.integer, np.floating)):
        raise DataError(f"keep must be a fraction (float) or a number of groups (int), got {keep!r}")
    if isinstance(keep, (float, np.floating)):
        keep = float(keep)
        if not 0.0 <= keep <= 1.0:
            raise DataError(f"keep fraction must lie in [0, 1], got {keep}")
        if site.partition is None:
            return int(round(keep * p)), None
        parts = np.asarray(site.partition)
        sizes = np.bincount(parts)
        budget = [int(round(keep * s)) for s in sizes]
        return int(sum(budget)), budget
    return int(keep), None


def site_instance(
    model: nn.Module,
    site: Site,
    gram: np.ndarray,
    samples: int,
    keep: float | int = 0.5,
    damping: float = DAMPING,
    meta: dict | None = None,
    correction: np.ndarray | None = None,
) -> Instance:
    """The Instance of one site from its Gram matrix X'X/n.

    correction: added to the target weights W_hat (`GramHooks.correction`):
    with c = (X'X/n + mu I)^-1 X'(R - S)/n, S the hidden state the
    consumer's output is added to (its residual sum) in this model and R the
    same state in the dense model on the same tokens, the instance fits the
    dense model's residual stream instead of the layer's own output.
    """
    W = site_weight(model, site).to("cpu", torch.float64).numpy()
    H = damped_gram(gram, damping)
    if correction is not None:
        if correction.shape != W.shape:
            raise DataError(f"{site.consumer}: the target correction has shape {correction.shape}, the weights "
                            f"{W.shape}: the hidden state recorded does not match this consumer's outputs")
        W = W + correction
    k, budget = keep_count(site, keep)
    partition = None if site.partition is None else (np.asarray(site.partition), budget)
    info = dict(meta or {})
    info.update({
        "layer": site.layer, "structure": site.structure, "module": site.consumer,
        "group_size": site.group_size, "damping": damping, "samples": samples,
    })
    if "expert" in site.extra:
        info["expert"] = site.extra["expert"]
    if isinstance(keep, float):
        info["keep_fraction"] = keep
    return Instance(H, W, k, group_size=site.group_size, partition=partition, meta=info)


def as_calibration(calibration: Any) -> Any:
    """The calibration as `_batches` takes it: token ids (or images) given as a numpy array or as
    nested lists of numbers become a tensor; a string is refused (it is not tokenized here)."""
    if isinstance(calibration, (str, bytes)):
        raise DataError("calibration is a string, not token ids: tokenize it first, e.g. "
                        "data.calibration(tokenizer, 'pydoc') or data.calibration(tokenizer, 'my_text.txt')")
    if isinstance(calibration, (list, tuple)) and calibration and _numbers(calibration[0]):
        try:
            calibration = np.asarray(calibration)
        except ValueError:
            raise DataError("calibration windows given as lists must all have the same length: "
                            "pad or crop them, or use data.calibration(tokenizer, ...)") from None
    if isinstance(calibration, np.ndarray):
        if calibration.dtype == object or calibration.dtype.kind not in "iuf":
            raise DataError(f"calibration array of dtype {calibration.dtype} holds no token ids or images: "
                            "give integer token ids (windows, seq_len)")
        t = torch.from_numpy(np.ascontiguousarray(calibration))
        return t.to(torch.get_default_dtype()) if t.is_floating_point() else t.long()
    return calibration


def _numbers(x: Any) -> bool:
    """A number, or a (possibly nested) list or tuple starting with one."""
    while isinstance(x, (list, tuple)) and x:
        x = x[0]
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def as_structures(structures: Any) -> tuple[str, ...] | None:
    """Structure names as a tuple (one name may be given as a string); None stays None."""
    if structures is None:
        return None
    return (structures,) if isinstance(structures, str) else tuple(structures)


def _batches(calibration: Any, batch_size: int):
    if isinstance(calibration, Calibration):
        yield from calibration.batches(batch_size)
    elif isinstance(calibration, torch.Tensor):
        if calibration.numel() == 0:
            raise DataError("the calibration tensor is empty: give at least one window")
        for a in range(0, calibration.shape[0], batch_size):
            yield calibration[a : a + batch_size]
    else:
        yield from calibration


def token_mask(batch: Any) -> torch.Tensor | None:
    """The attention mask of a batch given as a dict, else None (all tokens count)."""
    if isinstance(batch, dict) and "attention_mask" in batch:
        return batch["attention_mask"]
    return None


def describe_calibration(calibration: Any) -> dict:
    if isinstance(calibration, Calibration):
        return calibration.describe()
    if isinstance(calibration, torch.Tensor):
        return {"source": "tensor", "shape": list(calibration.shape)}
    return {"source": type(calibration).__name__}


def _to(x: Any, device: Any, copy: bool = False) -> Any:
    """`x` (a tensor, or tuples, lists and dicts of them) on `device`; with
    copy, new tensors also where they are there already."""
    if isinstance(x, torch.Tensor):
        return x.to(device, copy=copy)
    if isinstance(x, tuple):
        return tuple(_to(v, device, copy) for v in x)
    if isinstance(x, list):
        return [_to(v, device, copy) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, device, copy) for k, v in x.items()}
    return x


class _Stop(Exception):
    pass


def no_cache(model: nn.Module) -> dict:
    """The keyword that turns a forward pass's KV cache off, where the model has one."""
    return {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}


def run_model(model: nn.Module, adapter: Adapter, batch: Any, device: Any = None, stop_after: int | None = None) -> None:
    """Forward one batch through the model body (no task head), optionally
    stopping after block `stop_after`."""
    body = adapter.body()
    if device is None:  # the inputs go where the model is
        device = next((q.device for q in model.parameters()), None)
    handle = None
    if stop_after is not None and stop_after < adapter.n_layers - 1:
        def stop(module, args, output):
            raise _Stop

        handle = adapter.block(stop_after).register_forward_hook(stop)
    try:
        with torch.no_grad():
            # no KV cache: blocks are re-run on captured inputs by the driver
            extra = no_cache(model)
            if isinstance(batch, dict):
                body(**{k: v.to(device) if device is not None else v for k, v in batch.items()}, **extra)
            elif isinstance(batch, torch.Tensor) and not torch.is_floating_point(batch):
                body(input_ids=batch.to(device) if device is not None else batch, **extra)
            else:
                body(batch.to(device) if device is not None else batch)
    except _Stop:
        pass
    finally:
        if handle is not None:
            handle.remove()


def extract(
    model: nn.Module,
    calibration: Any,
    structures: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    damping: float = DAMPING,
    device: Any = None,
    keep: float | int = 0.5,
    batch_size: int = 8,
    progress: bool = True,
    model_name: str | None = None,
    offload: bool | None = None,
) -> list[Instance]:
    """Instances of every (layer, structure) site from dense-model activations.

    `calibration` is a `Calibration`, a tensor of token ids (or images for a
    CNN) batched along dim 0, or an iterable of ready batches. `keep` is the
    fraction (float) or number (int) of groups each instance keeps.
    The stacked experts of an MoE layer give one instance per expert (id
    suffix -e<expert>), each keeping `keep` of its own neurons.
    `device`: where the forward passes run (the model is moved there and
    back); None runs them where the model is. `offload`: the blocks take
    turns on `device` and the Gram matrices wait on the CPU (True), the
    whole model goes there (False), or whole only when it fits in the
    device's free memory (None, default).
    """
    from tqdm.auto import tqdm

    adapter = adapter_for(model)
    structures = as_structures(structures) or tuple(adapter.default_structures)
    for s in structures:
        adapter.check_structure(s)
    layers = list(range(adapter.n_layers)) if layers is None else [int(x) for x in layers]
    if not layers:
        raise DataError("no layers selected: pass layers=None for all or a list of layer indices")
    sites = adapter.sites(structures, layers)
    for site in sites:  # a keep out of range fails here, not after the calibration pass
        site = expert_sites(site)[0]  # stacked experts: keep is per expert
        k, _ = keep_count(site, keep)
        if not 0 <= k <= site.n_groups:
            raise DataError(f"keep={keep} is out of range for {site.consumer}: it has {site.n_groups} groups "
                            "(give a count in that range or a fraction in [0, 1])")
    calibration = as_calibration(calibration)
    dev = None if device is None else torch.device(device)
    home = next((q.device for q in model.parameters()), None)  # where the model goes back when done
    whole, where = (True, contextlib.nullcontext()) if dev is None else placed(model, dev, offload)
    try:
        model.eval()
        name = model_name or getattr(getattr(model, "config", None), "osscar_name", None) or \
            getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        n_batches = None
        if isinstance(calibration, (Calibration, torch.Tensor)):
            n = calibration.n_windows if isinstance(calibration, Calibration) else calibration.shape[0]
            n_batches = -(-n // batch_size)
        with where, GramHooks(model, [s.consumer for s in sites], device=dev,
                              store=None if whole else "cpu") as hooks:
            for batch in tqdm(_batches(calibration, batch_size), total=n_batches, desc="calibration",
                              disable=not progress, leave=False):
                hooks.mask = token_mask(batch)
                run_model(model, adapter, batch, dev, stop_after=max(layers))
            meta = {"model": name, "architecture": adapter.name,
                    "calibration": describe_calibration(calibration), "activations": "dense"}
            out = []
            for site in sites:
                for view, (gram, samples) in zip(expert_sites(site), hooks.site_stats(site)):
                    inst = site_instance(model, view, gram, samples, keep, damping, meta)
                    expert = f"-e{view.extra['expert']}" if "expert" in view.extra else ""
                    inst.meta["id"] = f"{name}-{site.id}{expert}"
                    out.append(inst)
    finally:  # the model goes back where it was, also after an error
        if dev is not None and home is not None:
            model.to(home)
    return out
