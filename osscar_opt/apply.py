"""The model driver: extract, solve and write back, layer by layer.

`apply(model, calibration, sparsity)` prunes every selected structure of
every layer and physically removes the pruned groups. Sequential by default
(as the published OSSCAR code): each layer is pruned on the activations of
the already-pruned upstream model; inside a block, attention is pruned before
the FFN so the FFN sees the pruned attention. Blocks are moved to the device
one at a time, so a model larger than the accelerator's memory works (with
dense activations the whole model is on the device for its one pass when it
fits, else its blocks take turns there, `placement.offloaded`); the model
ends where it started.

Targets: the published code refits each layer to its own dense output on
those pruned inputs (targets="layer"), so the error left upstream is carried
along. With targets="dense" (the default for transformers) the refits
instead reproduce the dense model's residual stream where each site's output
is added to it: a dense copy of the current block runs on the dense flow, and
each instance's target weights become W_hat + a (X'X/n + mu I)^-1 X'(R - S)/n
(`extract.fit_correction`), with S the residual sum in the pruned model, R
in the dense one, and the ridge mu and shrinkage a chosen per site by
two-fold validation on the calibration rows.

Extraction and write-back use the same code as `osscar_opt.extract`:
`GramHooks` on the consumer modules and `site_instance` to build each layer's
`Instance`.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn

from .adapters import (Adapter, BertAdapter, ConvAdapter, Site, adapter_for, expert_sites, set_weight_matrix, site_weight,
                       text_config, weight_matrix)
from .data import Calibration, DataError
from .errors import PruneError
from .evaluate import deployed
from .loss_select import HeldOut, choose_by_loss, loss_curvature
from .extract import (GramHooks, StateRecorder, _batches, as_calibration, as_structures, describe_calibration, keep_count,
                      _Stop, _to, run_model, site_instance, token_mask)
from .instance import DAMPING, DEFAULT_TARGETS, SELECT, TARGET_DAMPING, TARGETS, check_damping
from .placement import fits_on, placed
from .registry import solve

# structures pruned first inside a block (attention precedes the FFN)
_ORDER = {"heads": 0, "query-heads": 0, "kv-groups": 0, "neurons": 1, "shared-neurons": 1, "channels": 1}
ATTENTION_STRUCTURES = ("heads", "query-heads", "kv-groups")  # each removes o_proj inputs: one per call


@dataclass
class SiteReport:
    layer: int
    structure: str
    module: str
    groups: int
    kept: int
    err: float  # of the weights written into the model (refit, or W_hat for methods without refit)
    status: str
    seconds: float
    keep: list[int]
    target_fit: dict | None = None  # dense targets: the correction's ridge and shrinkage (GramHooks.correction)
    # stacked MoE experts (one instance each): per expert its kept count, err, status, seconds and the
    # calibration tokens routed to it; err above is their mean, seconds their sum
    experts: list[dict] | None = None
    # apply(compare=...): the err each other solver reaches on this site's instance (its support unused)
    compare: dict | None = None
    # apply(select="loss"): the solver's support and err, the estimated loss change of it and of the
    # support written (keep, err above), the supports scored and how ("all" or "swaps");
    # select="validation": the solver's support and err, the candidates (the solver's support, its
    # start) and their held-out scores
    selection: dict | None = None


@dataclass
class PruneReport:
    model: str
    solver: str
    sparsity: Any
    sequential: bool
    params_before: int
    params_after: int
    seconds: float
    solve_seconds: float
    sites: list[SiteReport] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    solver_params: dict = field(default_factory=dict)
    damping: float = DAMPING
    targets: str = "layer"
    target_damping: float | None = None
    select: str = "err"
    select_seconds: float = 0.0  # the backward pass and the scoring of supports (apply(select="loss"))
    # apply(select="validation"): the held-out inputs' shape, the structures checked, the score (causal LMs:
    # "loss", encoders: "1 - fidelity") and the dense model's, the sites where the solver's support
    # differed from its start and how many of them were written from the start
    validation: dict | None = None

    @property
    def mean_err(self) -> dict:
        out: dict[str, list[float]] = {}
        for s in self.sites:
            out.setdefault(s.structure, []).append(s.err)
        return {k: float(np.mean(v)) for k, v in out.items()}

    @property
    def comparison(self) -> dict:
        """Per solver of apply(compare=...): at how many sites `solver`'s err
        is lower than, equal to (relative 1e-9) or higher than its."""
        out: dict[str, dict[str, int]] = {}
        for s in self.sites:
            mine = s.err if s.selection is None else s.selection["solver_err"]  # the solver's, before select
            for name, err in (s.compare or {}).items():
                c = out.setdefault(name, {"lower": 0, "equal": 0, "higher": 0, "failed": 0})
                c["failed" if err is None else "equal" if abs(mine - err) <= 1e-9 * max(abs(err), 1e-30) else
                  "lower" if mine < err else "higher"] += 1
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean_err"] = self.mean_err
        comparison = self.comparison
        if comparison:
            d["comparison"] = comparison
        return d

    def to_markdown(self) -> str:
        lines = [
            f"# Pruning report: {self.model}",
            "",
            f"solver `{self.solver}`, sparsity {self.sparsity}, {'sequential' if self.sequential else 'dense'} activations, "
            f"{self.targets} targets" + ("" if self.targets != "dense" else f" (ridge {self.target_damping:g})"
                                         if self.target_damping is not None else " (validated ridge and shrinkage)")
            + f", damping {self.damping:g}, calibration {self.calibration}",
            "",
            f"parameters {self.params_before:,} -> {self.params_after:,} "
            f"({100 * (1 - self.params_after / max(self.params_before, 1)):.1f}% fewer); "
            f"{self.seconds:.1f} s in all, {self.solve_seconds:.1f} s solving",
            "",
        ]
        chosen = [s for s in self.sites if s.selection is not None]
        if self.validation is not None:
            v = self.validation
            lines += [f"select=validation ({', '.join(v['structures'])}): at {v['sites']} sites the solver's support "
                      f"differed from its start; {v['moved']} written from the start, of better {v['score']} on "
                      f"{v['inputs'][0]} held-out inputs ({self.select_seconds:.1f} s; the dense model's "
                      f"{v['score']}: {abs(v['dense_score']) if v['score'] != 'loss' else v['dense_score']:.4f})", ""]
        elif chosen:
            moved = [s for s in chosen if s.keep != s.selection["solver_keep"]]
            gain = sum(s.selection["solver_estimate"] - s.selection["estimate"] for s in chosen)
            lines += [f"select=loss: {len(chosen)} attention sites chosen by the estimated change of the calibration "
                      f"loss ({self.select_seconds:.1f} s); {len(moved)} differ from the solver's support, lowering "
                      f"the estimate by {gain:.3g} nats in all (err below: the support written)", ""]
        comparison = self.comparison
        others = list(comparison)
        for name, c in comparison.items():
            lines += [f"err of `{self.solver}` against `{name}` on the same instances: lower at {c['lower']} "
                      f"sites, equal at {c['equal']}, higher at {c['higher']}"
                      + (f"; `{name}` failed at {c['failed']}" if c["failed"] else ""), ""]
        lines += ["| layer | structure | groups | kept | err | status | seconds |"
                  + "".join(f" err of {n} |" for n in others), "|---|---|---|---|---|---|---|" + "---|" * len(others)]
        for s in self.sites:
            lines.append(f"| {s.layer} | {s.structure} | {s.groups} | {s.kept} | {s.err:.5f} | {s.status} | {s.seconds:.3f} |"
                         + "".join(f" {_cell((s.compare or {}).get(n))} |" for n in others))
        moe = [s for s in self.sites if s.experts]
        if moe:
            lines += ["", "Stacked experts (err above: the mean over the layer's experts), calibration tokens "
                      "routed to each: min / median / max; experts no token reached keep neurons by their "
                      "weights alone:", "", "| layer | experts | tokens min / median / max | experts without tokens |",
                      "|---|---|---|---|"]
            for s in moe:
                n = [e["samples"] for e in s.experts]
                idle = [str(e["expert"]) for e in s.experts if not e["samples"]]
                lines.append(f"| {s.layer} | {len(n)} | {min(n)} / {int(np.median(n))} / {max(n)} | "
                             f"{', '.join(idle) or '-'} |")
        return "\n".join(lines) + "\n"


def _mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def _cell(err: float | None) -> str:
    return "failed" if err is None else f"{err:.5f}"


def count_parameters(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _fraction_for(sparsity: Any, structure: str, layer: int) -> float:
    """Sparsity of one site from a float, {structure: s}, {layer: s} or {(layer, structure): s}."""
    value = sparsity
    if isinstance(sparsity, Mapping):
        for key in ((layer, structure), structure, layer, "default"):
            if key in sparsity:
                value = sparsity[key]
                break
        else:
            return 0.0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) < 1.0:
        raise PruneError(f"sparsity must be a number in [0, 1), got {value!r} for layer {layer} {structure}")
    return float(value)


def _flatten_sparsity(sparsity: Any) -> Any:
    """Nested per-layer mappings, {"neurons": {0: 0.5}} or {0: {"neurons": 0.5}}, as {(0, "neurons"): 0.5}."""
    if not isinstance(sparsity, Mapping) or not any(isinstance(v, Mapping) for v in sparsity.values()):
        return sparsity
    out: dict = {}
    for key, value in sparsity.items():
        if not isinstance(value, Mapping):
            out[key] = value
            continue
        for inner, v in value.items():
            pair = (inner, key) if isinstance(key, str) else (key, inner)
            if not (isinstance(pair[0], (int, np.integer)) and not isinstance(pair[0], bool)
                    and isinstance(pair[1], str) and pair[1] != "default"):
                raise PruneError(f"sparsity entry {key!r}: {{{inner!r}: ...}} must pair a structure with layer "
                                 "indices, e.g. {'neurons': {0: 0.5}} or {0: {'neurons': 0.5}}")
            out[(int(pair[0]), pair[1])] = v
    return out


def _check_sparsity(sparsity: Any) -> None:
    values = sparsity.values() if isinstance(sparsity, Mapping) else [sparsity]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= float(v) < 1.0:
            raise PruneError(f"sparsity must be a number in [0, 1) (the fraction of groups pruned), got {v!r}")


def _check_sparsity_keys(sparsity: Any, adapter: Adapter) -> None:
    """Every key of a sparsity mapping names something this model has."""
    if not isinstance(sparsity, Mapping):
        return
    for key in sparsity:
        parts = key if isinstance(key, tuple) and len(key) == 2 else (key,)
        for part in parts:
            if isinstance(part, str):
                if part != "default" or isinstance(key, tuple):
                    adapter.check_structure(part)
            elif isinstance(part, (int, np.integer)) and not isinstance(part, bool):
                adapter.check_layer(int(part))
            else:
                raise PruneError(f"sparsity key {key!r} is neither a structure, a layer index, (layer, structure) "
                                 "nor 'default'")


SolverKey = Union[str, tuple[int, str]]  # a structure, (layer, structure), or "default"


def _solver_key(key: Any, example: str) -> SolverKey:
    """"heads", "default", (0, "heads") or its written form "heads[0]"."""
    if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], str) and key[1] and \
            isinstance(key[0], (int, np.integer)) and not isinstance(key[0], bool):
        return int(key[0]), key[1]
    if isinstance(key, str) and key:
        m = re.fullmatch(r"\s*([A-Za-z][\w-]*)\s*(?:\[\s*(\d+)\s*\])?\s*", key)
        if m and m.group(2) is not None:
            return int(m.group(2)), m.group(1)
        if m:
            return m.group(1)
    raise PruneError(f"a solver mapping's keys are structures, STRUCTURE[LAYER] or 'default' ({example}), got {key!r}")


def parse_solver(solver: Any) -> str | dict[SolverKey, str]:
    """A solver's name, or one solver per structure: {"heads": "obs-greedy",
    "neurons": "osscar"}, also written "heads=obs-greedy+neurons=osscar"
    (or with commas); a layer's site takes its own with (layer, structure)
    keys, written "heads[0]=obs-greedy", and "default" names the solver of
    every site no other key covers."""
    if isinstance(solver, str) and "=" not in solver:
        return solver
    example = "e.g. 'heads=obs-greedy+neurons=osscar' or 'default=osscar+heads[0]=obs-greedy'"
    if isinstance(solver, str):
        parts = [p.strip() for p in re.split(r"[+,]", solver) if p.strip()]
        if not parts or any("=" not in p for p in parts):
            raise PruneError(f"a solver per structure is STRUCTURE=SOLVER parts joined by '+' or ',' ({example}), "
                             f"got {solver!r}")
        items = [tuple(x.strip() for x in p.split("=", 1)) for p in parts]
    elif isinstance(solver, Mapping):
        items = list(solver.items())
    else:
        raise PruneError(f"solver must be a registered solver's name or a mapping {{structure: name}} ({example}), "
                         f"got {solver!r}")
    out: dict[SolverKey, str] = {}
    for key, name in items:
        if not isinstance(name, str) or not name or "=" in name:
            raise PruneError(f"a solver per structure maps structure names to solver names ({example}), "
                             f"got {key!r}: {name!r}")
        k = _solver_key(key, example)
        if k in out:
            raise PruneError(f"the solver of {_key_text(k)!r} is given twice in {solver!r}: give it once")
        out[k] = name
    if not out:
        raise PruneError(f"the solver mapping is empty: name a solver, or one per structure ({example})")
    return out


def _key_text(key: SolverKey) -> str:
    return key if isinstance(key, str) else f"{key[1]}[{key[0]}]"


def solver_for(solvers: str | Mapping[SolverKey, str], layer: int, structure: str) -> str | None:
    """The solver of one site: its layer's key, else its structure's, else 'default'."""
    if isinstance(solvers, str):
        return solvers
    return solvers.get((layer, structure), solvers.get(structure, solvers.get("default")))


def solver_label(solver: str | Mapping[SolverKey, str]) -> str:
    """The name, or "heads=obs-greedy+neurons=osscar" for a solver per structure."""
    return solver if isinstance(solver, str) else "+".join(f"{_key_text(k)}={v}" for k, v in solver.items())


def declared_params(cls: Any) -> set[str]:
    """The parameter names a solver class's Params declares."""
    return {f.name for f in dataclasses.fields(cls.Params)}


def split_params(names: Sequence[str], solver_params: dict) -> dict[str, dict]:
    """Each solver's share of `solver_params`: one solver takes them all; several
    take the ones their Params declare, and a parameter none declares is refused."""
    from .registry import SolverError, available_solver

    names = list(dict.fromkeys(names))
    if len(names) == 1:
        return {names[0]: dict(solver_params)}
    fields = {n: declared_params(available_solver(n)) for n in names}
    for key in solver_params:
        if not any(key in f for f in fields.values()):
            raise SolverError(f"none of the solvers {', '.join(map(repr, names))} has a parameter {key!r}: "
                              "see `osscar-opt solvers` for each one's parameters")
    return {n: {k: v for k, v in solver_params.items() if k in fields[n]} for n in names}


def check_solver(solver: str | Mapping[str, str], device: Any, solver_params: dict) -> dict[str, dict]:
    """The solver (or each solver of a per-structure one) exists, runs here, takes
    these parameters and the device: before any layer is touched. Returns each
    solver's share of the parameters (`split_params`)."""
    from .registry import available_solver, make_params, resolve_device

    spec = parse_solver(solver)
    shares = split_params([spec] if isinstance(spec, str) else list(spec.values()), solver_params)
    for name, params in shares.items():
        cls = available_solver(name)
        make_params(cls, params)
        if device is not None:
            resolve_device(device, cls.devices)
    return shares


def check_sizes(solver: str, solver_params: dict, model: nn.Module, plan: Sequence[tuple[Site, float]]) -> None:
    """Ask the solver about every site's size before any layer is touched: a
    solver that skips large instances (bnb's max_groups, enumerate's
    max_supports) would otherwise fail at the first large layer, after
    pruning the ones before it. Each distinct shape is shown to the solver's
    `skip` as an instance of that size (identity H)."""
    from .instance import Instance
    from .registry import Solver, available_solver, make_params

    cls = available_solver(solver)
    if cls.skip is Solver.skip:
        return
    impl, params, seen = cls(), make_params(cls, solver_params), set()
    for site, frac in plan:
        site = expert_sites(site)[0]  # stacked experts: each expert is an instance of its own
        k, budget = keep_count(site, _keep_for(site, frac))
        d, m = site_weight(model, site).shape
        parts = None if site.partition is None else tuple(np.asarray(site.partition).tolist())
        key = (d, m, site.group_size, k, parts, None if budget is None else tuple(budget))
        if key in seen:
            continue
        seen.add(key)
        proxy = Instance(np.eye(d), np.ones((d, m)), k, group_size=site.group_size,
                         partition=None if parts is None else (np.asarray(parts), budget))
        skip, why = impl.skip(proxy, params)
        if skip:
            raise PruneError(f"solver {solver!r} cannot take layer {site.layer} {site.structure} ({why}): "
                             "choose another solver, raise that limit, or prune other structures")


def _check_tokens(model: nn.Module, adapter: Adapter, calibration: Any) -> Any:
    """Token-id calibration of a transformer: integer ids of shape (windows, seq_len) inside the
    model's vocabulary (a single 1-D window gets its batch dimension). Returns the calibration."""
    if isinstance(adapter, ConvAdapter):
        return calibration
    ids = calibration.input_ids if hasattr(calibration, "input_ids") and not isinstance(calibration, Mapping) else \
        calibration if isinstance(calibration, torch.Tensor) else None
    if ids is None or ids.numel() == 0:
        return calibration
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise DataError(f"calibration token ids must be integers, got {ids.dtype}: pass the tokenizer's input_ids "
                        "(or data.calibration(tokenizer, ...))")
    if ids.dim() == 1 and isinstance(calibration, torch.Tensor):
        calibration = ids = calibration[None, :]
    if ids.dim() != 2:
        raise DataError(f"calibration token ids must have shape (windows, seq_len), got {tuple(ids.shape)}")
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embed, "num_embeddings", None)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise DataError(f"calibration token id {lo if lo < 0 else hi} lies outside the model's vocabulary "
                        f"(0..{vocab - 1 if vocab is not None else '?'}): tokenize with this model's own tokenizer")
    return calibration


def _keep_for(site: Site, fraction: float) -> int | float:
    """Groups kept: (1 - sparsity) of them, at least one (per KV group for GQA heads);
    a site that asks for a multiple (stacked MoE experts: 8) keeps the nearest one."""
    keep_frac = 1.0 - fraction
    multiple = site.extra.get("multiple")
    if multiple and site.partition is None and site.n_groups > multiple:
        return int(min(site.n_groups, max(multiple, multiple * round(keep_frac * site.n_groups / multiple))))
    if site.partition is not None:
        sizes = np.bincount(np.asarray(site.partition))
        budget = [max(1, int(round(keep_frac * s))) for s in sizes]
        if len(set(budget)) == 1 and len(set(sizes.tolist())) == 1:
            return int(sum(budget))
        return keep_frac
    return max(1, int(round(keep_frac * site.n_groups)))


# keyword arguments of a block that carry a KV cache: never replayed
_CACHE_KWARGS = ("use_cache", "past_key_values", "past_key_value", "cache", "layer_past")


def _layer_kinds(model: nn.Module, adapter: Adapter) -> list:
    """Every block's kind: blocks of different kinds receive different keyword
    inputs from the model (config.layer_types: sliding-window and full
    attention layers take different masks, and Gemma3's also different
    rotary tables). One kind (None) when the config names none."""
    config = getattr(model, "config", None)
    kinds = getattr(text_config(config), "layer_types", None) if config is not None else None
    n = adapter.n_layers
    if not isinstance(kinds, (list, tuple)) or len(kinds) < n:
        return [None] * n
    return list(kinds[:n])


def _capture_block_inputs(model: nn.Module, adapter: Adapter, calibration: Any, batch_size: int,
                          device: Any) -> list[tuple[tuple, dict, Any]]:
    """For every calibration batch: the positional inputs of block 0, the
    keyword inputs of the first block of each layer kind ({kind: kwargs}),
    and the batch's token mask. The forward stops at the last of those blocks."""
    kinds = _layer_kinds(model, adapter)
    firsts = {kind: kinds.index(kind) for kind in dict.fromkeys(kinds)}
    last = max(firsts.values())
    captured: list[tuple[tuple, dict, Any]] = []
    mask = None
    args0: tuple = ()
    by_kind: dict = {}

    def grabber(kind, layer):
        def grab(module, args, kwargs):
            nonlocal args0
            if layer == 0:
                args0 = tuple(_to(a, "cpu") for a in args)
            by_kind[kind] = {k: _to(v, "cpu") for k, v in kwargs.items() if k not in _CACHE_KWARGS}
            if layer == last:
                raise _Stop
        return grab

    handles = [adapter.block(layer).register_forward_pre_hook(grabber(kind, layer), with_kwargs=True)
               for kind, layer in firsts.items()]
    try:
        for batch in _batches(calibration, batch_size):
            mask = token_mask(batch)
            by_kind = {}
            try:
                run_model(model, adapter, batch, device)
            except _Stop:
                pass
            captured.append((args0, by_kind, mask))
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise DataError("the calibration data produced no batches: give at least one window")
    return captured


def _within(prefix: str, path: str) -> str:
    """A module path relative to the block at `prefix` ("" for the block itself)."""
    if path == prefix:
        return ""
    if not path.startswith(prefix + "."):
        raise PruneError(f"{path} is not inside the block {prefix}")
    return path[len(prefix) + 1:]


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict, Any]], device: Any, keep_outputs: bool,
               kind: Any = None, hooks: GramHooks | StateRecorder | None = None) -> list:
    """Run one block (of layer kind `kind`) on captured inputs; with
    keep_outputs, its outputs as the next block's inputs."""
    outs = []
    with torch.no_grad():
        for args, by_kind, mask in inputs:
            if hooks is not None:
                hooks.mask = mask
            out = block(*_to(args, device), **_to(by_kind[kind], device))
            if keep_outputs:
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                outs.append(((hidden.to("cpu"),) + tuple(args[1:]), by_kind, mask))
    return outs


def apply(
    model: nn.Module,
    calibration: Any,
    sparsity: float | Mapping[Any, float],
    solver: str | Mapping[Any, str] = "osscar",
    structures: Sequence[str] | None = None,
    sequential: bool = True,
    damping: float = DAMPING,
    device: Any = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    time_limit: float | None = None,
    targets: str | None = DEFAULT_TARGETS,
    target_damping: float | None = TARGET_DAMPING,
    offload: bool | None = None,
    compare: Sequence[str] = (),
    select: str = "err",
    validation: Any = None,
    validate: Sequence[str] | None = None,
    **solver_params: Any,
) -> PruneReport:
    """Prune `model` in place and return a report.

    sparsity: fraction of groups pruned, a float for every structure, or a
        mapping per structure ({"heads": 0.25, "neurons": 0.5}), per layer
        index, or per (layer, structure) ({(0, "neurons"): 0.5}, also written
        {"neurons": {0: 0.5}} or {0: {"neurons": 0.5}}); missing entries are
        not pruned.
        A mapping naming "query-heads" or "kv-groups" (Llama GQA) prunes that
        instead of "heads" when `structures` is not given.
    structures: the structures pruned (default: the architecture's, e.g.
        heads and neurons; neurons alone where heads cannot be removed, as
        with OLMo2's q/k norms or DeepSeek's latent attention; plus any
        structure a sparsity mapping names). Llama "heads" keeps the same number of query
        heads in every KV group (round(keep x heads per group) each);
        "query-heads" keeps round(keep x heads) anywhere and duplicates KV
        heads where the groups differ; "kv-groups" removes whole KV groups.
        MoE models: "neurons" prunes every routed expert, each solved on
        its own routed tokens and keeping the same number (the nearest
        multiple of 8), refit to layer targets (in a dense FFN layer of an
        MoE model, the FFN neurons); "shared-neurons" the shared expert(s).
    solver: any registered solver name; solver_params go to it. Or one solver
        per structure, {"heads": "obs-greedy", "neurons": "osscar"} (also
        written "heads=obs-greedy+neurons=osscar"), covering every structure
        pruned; each solver takes the solver_params its parameters declare.
        A (layer, structure) key gives one layer's site its own solver and
        "default" every site no other key covers: {"default": "osscar",
        (0, "heads"): "obs-greedy"}, written "default=osscar+heads[0]=obs-greedy".
    sequential: each layer sees the already-pruned upstream (default), else
        every layer is pruned on the dense model's activations.
    targets: what a sequential site's refit reproduces from its (pruned-
        upstream) inputs X: "layer" (the published mode) the layer's own
        dense output X W_hat; "dense" the dense model's residual stream where
        the site's output is added to it, so every site also corrects the
        error the sites pruned before it left there (a dense copy of the
        current block runs alongside; transformers whose sites add their
        output to the residual stream unnormalized, so not Gemma2/3, OLMo2). None
        (default): "dense" for sequential pruning where it can be fitted,
        else "layer".
        SmolLM2 at 30 / 50 / 60%: perplexity 17.7 / 20.6 / 37.5 with dense
        targets, 19.9 / 25.2 / 51.2 with layer targets.
    target_damping: the ridge of the dense-target correction (fraction of
        the mean diagonal, like `damping`), or None (default): the ridge and
        a shrinkage of the correction chosen per site by two-fold validation
        on the calibration rows (`extract.fit_correction`). The correction
        is fitted to the residual gap of the calibration tokens; a fixed
        ridge lets it follow their noise when few heads are left (SmolLM2,
        4 of 9 heads kept at 50%: perplexity 80 with ridge 0.1, 27.6
        validated).
    select: how an attention site's support is chosen. "err" (default): the
        solver's support (the lowest layer err it finds). "loss": the
        feasible support (every one when there are at most 512, else
        best-improvement swaps from the solver's) with the lowest
        second-order estimate of the change of the model's calibration loss
        (`loss_select`), from one backward pass over the calibration windows
        before pruning; every support keeps its refit weights. Causal LMs
        only. Not the default: on SmolLM2 it ranks one site's head choices
        better than err does, but the whole model's perplexity is higher
        (see `loss_select`). "validation": at each site of the `validate`
        structures where the solver reports the support it started from
        (OSSCAR: its greedy's) and its local search moved away from it, the
        one of the two with the better score on the `validation` inputs is
        written: a causal LM's next-token loss, an encoder's 1 - cosine
        similarity of its mean-pooled embeddings to the dense model's (the
        model as pruned so far, the later layers still dense; two forward
        passes of the validation inputs per such site through the blocks
        from the site's on, the finished blocks' outputs recorded once and
        reused, so a site at layer l costs about (L - l) / L of two full
        passes, plus one pass over the whole run). Solvers that report
        no start keep their support; stacked MoE experts are not checked.
    validation: held-out inputs for select="validation", none of them
        among the calibration: (n, seq_len) token ids, or for an encoder a
        `data.Calibration` (or a tokenizer's output) with its attention mask.
        `data.validation_windows` / `data.validation_paragraphs` cut them
        from the calibration half apart from a (seeded or consecutive)
        calibration draw.
    validate: the structures select="validation" checks (default: the
        attention heads; ("heads", "neurons") also the FFN neurons).
    device: where the forward passes and the solver run (default: CPU). The
        sequential mode holds one block there at a time.
    compare: other registered solvers, run with their default parameters on
        every site's instance beside `solver` (sequential inputs and dense
        targets included); only `solver`'s support is written, and each
        site's report gives their err beside its own (`PruneReport.comparison`
        counts the sites where `solver` is lower, equal or higher). Their
        time counts in the report's seconds, not its solve_seconds.
    offload: with dense activations (or a CNN), the whole model goes to
        `device` (False), its blocks take turns there (True), or whole only
        when it fits in the device's free memory (None, default).
    """
    from tqdm.auto import tqdm

    from .surgery import check_prunable, remove_groups

    sparsity = _flatten_sparsity(sparsity)
    _check_sparsity(sparsity)
    damping = check_damping(damping)
    target_damping = None if target_damping is None else check_damping(target_damping)
    if targets is not None and targets not in TARGETS:
        raise PruneError(f"targets must be one of {', '.join(repr(t) for t in TARGETS)} or None, got {targets!r}")
    adapter = adapter_for(model)
    unsupported = adapter.dense_targets_unsupported()
    if targets == "dense" and not sequential:
        raise PruneError("targets='dense' needs sequential=True (with dense activations every site fits the "
                         "dense model already): use targets='layer'")
    if targets == "dense" and unsupported:
        raise PruneError(f"targets='dense' cannot be used here: {unsupported}; use targets='layer'")
    if targets is None:
        targets = "dense" if sequential and not unsupported else "layer"
    structures = as_structures(structures)
    if structures is None:
        structures = adapter.default_structures
        if isinstance(sparsity, Mapping):  # {"query-heads": s} or {"kv-groups": s} stands in for "heads"
            names = {k[1] if isinstance(k, tuple) and len(k) == 2 else k for k in sparsity}
            named = [k for k in ATTENTION_STRUCTURES if k in names and k != "heads" and k in adapter.structures]
            if named:
                structures = tuple(s for s in structures if s != "heads") + tuple(named)
            # a structure the mapping names is pruned where the defaults leave it out (OLMo2's heads: refused
            # below with the reason), never silently skipped
            extra = [k for k in adapter.structures if k in names and k not in structures]
            if any(k in ATTENTION_STRUCTURES for k in structures):
                extra = [k for k in extra if k not in ATTENTION_STRUCTURES]
            structures = tuple(structures) + tuple(extra)
    structures = tuple(structures)
    for s in structures:
        adapter.check_structure(s)
    both = [s for s in ATTENTION_STRUCTURES if s in structures]
    if len(both) > 1:
        raise PruneError(f"prune one of {', '.join(repr(s) for s in both)} in one call, not several: "
                         "each removes o_proj inputs")
    structures = tuple(sorted(structures, key=lambda s: _ORDER.get(s, 1)))
    layer_ids = list(range(adapter.n_layers)) if layers is None else [int(x) for x in layers]
    for layer in layer_ids:
        adapter.check_layer(layer)
    plan = [(adapter.site(s, layer), _fraction_for(sparsity, s, layer)) for layer in layer_ids for s in structures
            if adapter.has_site(s, layer)]
    plan = [(site, frac) for site, frac in plan if frac > 0.0]
    _check_sparsity_keys(sparsity, adapter)
    for site, _ in plan:  # refuse shared weights or unsupported modules before touching anything
        check_prunable(model, site)
    calibration = as_calibration(calibration)
    if isinstance(calibration, torch.Tensor) and calibration.numel() == 0:
        raise DataError("the calibration tensor is empty: give at least one window")
    calibration = _check_tokens(model, adapter, calibration)
    solvers = parse_solver(solver)
    params_of = check_solver(solvers, device, solver_params)
    if isinstance(solvers, dict):
        pruned = {(site.layer, site.structure) for site, _ in plan}
        for key in solvers:
            if key == "default":
                continue
            structure = key if isinstance(key, str) else key[1]
            adapter.check_structure(structure)
            if isinstance(key, tuple):
                adapter.check_layer(key[0])
            if structure not in structures or (isinstance(key, tuple) and key not in pruned):
                raise PruneError(f"the solver mapping names {_key_text(key)!r}, which this call does not prune "
                                 f"(structures: {', '.join(structures)}): leave it out, or prune it")
        missing = [site for site, _ in plan if solver_for(solvers, site.layer, site.structure) is None]
        if missing:
            s = missing[0].structure
            raise PruneError(f"the solver mapping gives no solver for {s!r} (layer {missing[0].layer}), which this "
                             f"call prunes: add {s}=NAME or default=NAME (e.g. '{solver_label(solvers)}+{s}=osscar')")

    def solver_of(site: Site) -> str:
        return solver_for(solvers, site.layer, site.structure)

    for name, params in params_of.items():
        check_sizes(name, params, model, [(site, f) for site, f in plan if solver_of(site) == name])
    label = solver_label(solvers)
    compare = [compare] if isinstance(compare, str) else list(dict.fromkeys(compare))
    for other in compare:
        if not isinstance(other, str) or "=" in other:
            raise PruneError(f"compare takes registered solvers' names, got {other!r}")
        check_solver(other, device, {})
        check_sizes(other, {}, model, plan)
    chosen = [site for site, _ in plan if site.structure in ATTENTION_STRUCTURES]
    if select not in SELECT:
        raise PruneError(f"select must be one of {', '.join(map(repr, SELECT))}, got {select!r}")
    if (validation is None) != (select != "validation"):
        raise PruneError("select='validation' needs held-out windows: pass validation=(n, seq_len) token ids that "
                         "are not calibration windows" if validation is None else
                         f"validation windows are only read by select='validation' (select is {select!r}): leave "
                         "them out, or choose select='validation'")
    held_out = None
    validated = tuple(s for s in structures if s in ATTENTION_STRUCTURES) if validate is None else \
        as_structures(validate)
    if validate is not None and select != "validation":
        raise PruneError(f"validate names the structures select='validation' checks (select is {select!r}): "
                         "leave it out, or choose select='validation'")
    stray = [s for s in validated if s not in structures]
    if stray:
        raise PruneError(f"validate names {stray[0]!r}, which this call does not prune (structures: "
                         f"{', '.join(structures)}): leave it out, or prune it")
    if validation is not None:
        if isinstance(validation, Mapping) and "input_ids" in validation:  # a tokenizer's output
            validation = Calibration(validation["input_ids"], attention_mask=validation.get("attention_mask"))
        elif not isinstance(validation, Calibration):
            validation = Calibration(torch.as_tensor(as_calibration(validation)))
        _check_tokens(model, adapter, validation)
        held_out = HeldOut(validation, encoder=isinstance(adapter, BertAdapter))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    name = getattr(getattr(model, "config", None), "osscar_name", None) or \
        getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    report = PruneReport(model=name, solver=label, sparsity=sparsity if not isinstance(sparsity, Mapping) else
                         {str(k): v for k, v in sparsity.items()}, sequential=sequential,
                         params_before=count_parameters(model), params_after=0, seconds=0.0, solve_seconds=0.0,
                         calibration=describe_calibration(calibration), solver_params=dict(solver_params),
                         damping=damping, targets=targets, select=select)
    if targets == "dense":
        report.target_damping = target_damping
    start = time.perf_counter()
    model.eval()
    curvature = {}
    if select == "loss" and chosen:  # the loss gradients at each attention consumer, before any change
        # (a model without next-token logits is refused there, untouched)
        home = next(model.parameters()).device
        there = dev if offload is not True and fits_on(model, dev) else home
        try:
            model.to(there)
            curvature = loss_curvature(model, [site.consumer for site in chosen],
                                       _batches(calibration, min(batch_size, 4)), there)
        finally:
            model.to(home)
        report.select_seconds += time.perf_counter() - start
    model_home = next(model.parameters()).device
    block = home = None  # the sequential loop's current block and where it goes back (below)

    def held_out_score(layer: int = 0) -> float:
        """The model's held-out score as it is now (`HeldOut`): all of it where
        it fits (else where it is kept), the current block back on the device after.
        The blocks before `layer` are finished: their held-out outputs are
        recorded once and the score runs only the blocks from `layer` on."""
        there = dev if offload is not True and fits_on(model, dev) else model_home
        try:
            model.to(there)
            finished = [] if isinstance(adapter, ConvAdapter) else [adapter.block(j) for j in range(layer)]
            held_out.record(model, finished, there)
            return held_out(model, there, skip=finished)
        finally:
            model.to(model_home)
            if block is not None:
                block.to(dev)

    if select == "validation":  # the dense model's, and a model it cannot score refused, untouched
        report.validation = {"inputs": list(validation.input_ids.shape), "structures": list(validated),
                             "score": "1 - fidelity" if held_out.encoder else "loss",
                             "dense_score": held_out_score(), "sites": 0, "moved": 0}
        report.select_seconds += time.perf_counter() - start
    meta = {"model": name, "architecture": adapter.name, "calibration": report.calibration,
            "activations": "sequential" if sequential else "dense"}

    def prune_site(site: Site, frac: float, stats: list[tuple[np.ndarray, int]],
                   correction: np.ndarray | None = None, fit: dict | None = None) -> None:
        views = expert_sites(site)  # [site], or one site per expert of stacked MoE experts
        keeps, weights, rows, selection = [], [], [], None
        name = solver_of(site)
        for view, (gram, samples) in zip(views, stats):
            inst = site_instance(model, view, gram, samples, keep=_keep_for(view, frac), damping=damping,
                                 meta=meta, correction=correction)
            sol = solve(inst, name, device=device, time_limit=time_limit, **params_of[name])
            where = f" expert {view.extra['expert']}" if "expert" in view.extra else ""
            if sol.status.value == "ERROR":
                raise PruneError(f"solver {name!r} failed on layer {site.layer} {site.structure}{where}: "
                                 f"{sol.message}")
            offset = view.extra.get("offset", 0)
            keep, err, picked = np.asarray(sol.keep, dtype=np.int64), sol.deployed_err, sol.weights
            if view.consumer in curvature:
                t = time.perf_counter()
                choice = choose_by_loss(inst, keep, curvature[view.consumer], refits="err_no_refit" not in sol.info,
                                        device=device)
                selection = {"solver_keep": keep.tolist(), "solver_err": err, "estimate": choice.estimate,
                             "solver_estimate": choice.start_estimate, "scored": choice.scored,
                             "method": choice.method}
                keep, err, picked = choice.keep, choice.err, choice.weights
                report.select_seconds += time.perf_counter() - t
            start_keep = sol.info.get("greedy_keep") if select == "validation" and len(views) == 1 and \
                site.structure in validated else None
            if start_keep is not None and sorted(start_keep) != sorted(keep.tolist()):
                t = time.perf_counter()
                S0, w0, err0 = deployed(inst, start_keep, refits="err_no_refit" not in sol.info, device=device)
                module = model.get_submodule(view.consumer)
                original = weight_matrix(module).clone()
                candidates = [(keep, err, picked), (np.asarray(S0, dtype=np.int64), err0, w0)]
                scores = []
                try:
                    for _, _, w in candidates:
                        set_weight_matrix(module, torch.as_tensor(np.asarray(w)))
                        scores.append(held_out_score(site.layer))
                finally:
                    set_weight_matrix(module, original)
                best = int(np.argmin(scores))  # a tie keeps the solver's
                selection = {"solver_keep": keep.tolist(), "solver_err": err, "method": "validation",
                             "candidates": [c[0].tolist() for c in candidates], "scores": scores}
                keep, err, picked = candidates[best]
                report.validation["sites"] += 1
                report.validation["moved"] += best != 0
                report.select_seconds += time.perf_counter() - t
            keeps.append(offset + keep)
            if picked is not None:
                weights.append(np.asarray(picked))
            rows.append({"expert": view.extra.get("expert"), "kept": int(keep.size), "err": err,
                         "status": str(sol.status), "seconds": sol.seconds, "samples": samples})
            report.solve_seconds += sol.seconds
            for other in compare:
                alt = solve(inst, other, device=device, time_limit=time_limit)  # a failure: None, pruning goes on
                rows[-1].setdefault("compare", {})[other] = None if alt.status.value == "ERROR" else alt.deployed_err
        keep = np.concatenate(keeps)
        remove_groups(model, site, keep, np.concatenate(weights) if len(weights) == len(views) else None)
        if held_out is not None and site.layer < held_out.n_recorded:  # a recorded block changed
            held_out.forget()
        status = ",".join(dict.fromkeys(r["status"] for r in rows))
        report.sites.append(SiteReport(site.layer, site.structure, site.consumer, site.n_groups, int(keep.size),
                                       float(np.mean([r["err"] for r in rows])), status,
                                       float(sum(r["seconds"] for r in rows)), keep.tolist(), fit,
                                       rows if len(views) > 1 else None,
                                       {n: _mean_or_none([r["compare"][n] for r in rows]) for n in compare} or None,
                                       selection))

    bar = tqdm(total=len(plan), desc=f"pruning ({label})", disable=not progress, leave=False)
    if not sequential or isinstance(adapter, ConvAdapter):
        # Dense activations (one pass), or sequential CNNs by one forward per site.
        todo = list(plan)
        home = next(model.parameters()).device  # where the model goes back when done, like the blocks below
        whole = fits_on(model, dev) if offload is None else not offload  # else one block at a time there
        try:
            while todo:
                batch_sites = todo if not sequential else todo[:1]
                _, where = placed(model, dev, offload=not whole)
                # offloaded, every site's Gram matrix waits on the CPU (they would not fit beside the blocks)
                with where, GramHooks(model, [s.consumer for s, _ in batch_sites], device=dev,
                                      store=None if whole else "cpu") as hooks:
                    for batch in _batches(calibration, batch_size):
                        hooks.mask = token_mask(batch)
                        run_model(model, adapter, batch, dev, stop_after=None if isinstance(adapter, ConvAdapter)
                                  else max(s.layer for s, _ in batch_sites))
                    stats = {s.consumer: hooks.site_stats(s) for s, _ in batch_sites}
                for site, frac in batch_sites:
                    prune_site(site, frac, stats[site.consumer])
                    bar.update()
                todo = todo[len(batch_sites):]
                if not sequential:
                    break
        finally:  # back where it was, also after an error
            model.to(home)
    else:
        # the embeddings run where the model is (run_model's default: on the GPU after evaluate_model(device="cuda"))
        inputs = _capture_block_inputs(model, adapter, calibration, batch_size, None)
        dense_inputs = inputs if targets == "dense" else None  # the dense model's flow, block by block
        by_layer: dict[int, list[tuple[Site, float]]] = {}
        for site, frac in plan:
            by_layer.setdefault(site.layer, []).append((site, frac))
        last = max(by_layer) if by_layer else -1
        kinds = _layer_kinds(model, adapter)
        block = home = None
        try:
            for layer in range(last + 1):
                block = adapter.block(layer)
                home = next(block.parameters()).device
                block.to(dev)
                sites = by_layer.get(layer, [])
                points = {s.consumer: adapter.residual_point(s.structure, layer) for s, _ in sites} \
                    if dense_inputs is not None else {}
                points = {c: p for c, p in points.items() if p is not None}  # None: layer targets (MoE experts)
                recorded: dict[str, list[torch.Tensor]] = {}
                if dense_inputs is not None:
                    # a dense copy of the block on the dense flow: its residual sums, then its outputs
                    dense_block = copy.deepcopy(block)
                    prefix = adapter.block_name(layer)
                    local = {c: (_within(prefix, path), kind) for c, (path, kind) in points.items()}
                    with StateRecorder(dense_block, local) as rec:
                        dense_inputs = _run_block(dense_block, dense_inputs, dev, layer < last, kinds[layer], rec)
                    recorded = rec.rows
                    del dense_block
                for site, frac in sites:
                    # the site's current shape (an earlier site of this block may have changed nothing here)
                    deltas = {site.consumer: (points[site.consumer], recorded[site.consumer])} \
                        if site.consumer in recorded else None
                    site = adapter.site(site.structure, layer)
                    with GramHooks(model, [site.consumer], device=dev, deltas=deltas) as hooks:
                        _run_block(block, inputs, dev, False, kinds[layer], hooks)
                        stats = hooks.site_stats(site)
                        correction, fit = hooks.correction(site.consumer, target_damping) if deltas else (None, None)
                    if correction is not None:  # the change of the consumer's output, not of the residual sum
                        correction = correction / adapter.residual_scale(site.structure, layer)
                    prune_site(site, frac, stats, correction, fit)
                    bar.update()
                if layer < last:
                    inputs = _run_block(block, inputs, dev, True, kinds[layer])
                block.to(home)
                block = None
        finally:  # after an error, the block being pruned goes back where it was
            if block is not None:
                block.to(home)
    bar.close()
    report.params_after = count_parameters(model)
    report.seconds = time.perf_counter() - start
    return report
