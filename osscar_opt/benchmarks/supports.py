"""Does a lower layer-wise err give a better model? `osscar-opt bench-supports`.

Every solver in this project minimizes a site's reconstruction error err(S)
over the feasible supports S. This benchmark checks how well that objective
ranks the supports by what a user measures, on a site small enough to
enumerate (SmolLM2's heads: 9 query heads in 3 KV groups, keeping the same
number per group, so 27 supports at 20-50% sparsity).

For one site of the dense model (only that site pruned; its instance is
extracted from the dense model's activations on the calibration windows, as
`osscar_opt.extract` does), every feasible support is written into a copy of
the model with its refit weights, and measured by:

- err: the site's objective (what the solvers minimize);
- validation err: the same refit weights scored on the validation
  windows' Gram matrix (held-out data, no forward pass per support);
- calibration loss: the model's next-token loss on the first
  `loss_windows` calibration windows (the data the instance was built from);
- calibration KL: on the same windows, the mean KL divergence of the
  model's next-token distributions from the dense model's (what the whole
  model, not the layer, shows of the change on the calibration data);
- cross-fitted calibration loss: the calibration windows split in two
  halves; the support refit on each half's instance and the model's loss
  measured on the other half, the two averaged (calibration data only, but
  never scored on the rows its refit saw);
- estimated loss change: the second-order estimate of the change of the
  calibration loss that apply(select="loss") minimizes (`loss_select`;
  one backward pass over the calibration windows, no forward pass per
  support);
- validation perplexity: calibration-half windows after the calibration
  ones (never the evaluation half);
- evaluation perplexity: the evaluation half (the figure the sweeps quote).

The report gives each criterion's Spearman correlation with the evaluation
perplexity, the support each criterion picks and where that support ranks on
the evaluation half, and the supports the given solvers pick. Rows go to
results/supports_<model>_l<layer>_<structure>_<sparsity>.jsonl as they finish
(a rerun skips supports already measured, and adds the criteria a row lacks,
such as the calibration KL or cross-fitted loss of rows measured before they
existed), the table to the .md beside it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..instance import DAMPING
from ..io import atomic_write, writable_folder
from . import RESULTS, machine_line
from .prune import _append, _rows

CRITERIA = (("err", "layer err (the solvers' objective)"),
            ("validation_err", "layer err on the validation windows"),
            ("calibration_loss", "calibration loss"),
            ("calibration_kl", "calibration KL from the dense model"),
            ("crossfit_loss", "cross-fitted calibration loss"),
            ("loss_estimate", "estimated loss change (select='loss')"),
            ("validation_perplexity", "validation perplexity"))


def _stem(model_name: str, layer: int, structure: str, sparsity: float) -> str:
    return f"supports_{model_name}_l{layer}_{structure}_{round(sparsity * 100)}"


def _mean_loss(model, windows, batch_size: int = 4) -> float:
    from ..evaluation import perplexity

    return math.log(perplexity(model, windows, batch_size=batch_size))


def run(model_name: str = "smollm2-135m", layer: int = 0, structure: str = "heads", sparsity: float = 0.3,
        nsamples: int = 32, seq_len: int = 512, eval_windows: int = 40, validation_windows: int = 40,
        loss_windows: int = 8, damping: float = DAMPING, solvers: Sequence[str] = ("osscar", "obs-greedy"),
        max_supports: int = 64, out: str | Path | None = None) -> dict:
    """Load the embedded model and the pydoc windows, then `measure`."""
    import torch

    from .. import data, models
    from ..apply import PruneError

    if not 0.0 < sparsity < 1.0:
        raise PruneError(f"sparsity must lie in (0, 1), got {sparsity}")
    out = Path(out) if out else RESULTS
    writable_folder(out)
    if model_name in models.EMBEDDED and models.EMBEDDED[model_name].kind != "causal-lm":
        raise PruneError(f"bench-supports measures perplexity: {model_name} is not a causal LM")
    dense, tok = models.load(model_name, dtype=torch.float32)
    cal = data.calibration(tok, "pydoc", nsamples, seq_len)
    evaluation = data.windows(tok, "pydoc", "evaluation", eval_windows, seq_len)
    validation = None
    if validation_windows:
        validation = data.windows(tok, "pydoc", "calibration", nsamples + validation_windows, seq_len)[nsamples:]
    summary = measure(dense, cal, evaluation, validation, layer, structure, sparsity,
                      out / f"{_stem(model_name, layer, structure, sparsity)}.jsonl", loss_windows=loss_windows,
                      damping=damping, solvers=solvers, max_supports=max_supports, model_name=model_name)
    print(json.dumps({k: summary[k] for k in ("spearman", "picked")}, indent=2))
    return summary


def measure(dense, calibration, evaluation, validation, layer: int, structure: str, sparsity: float, log: Path,
            loss_windows: int = 8, damping: float = DAMPING, solvers: Sequence[str] = ("osscar", "obs-greedy"),
            max_supports: int = 64, model_name: str | None = None) -> dict:
    """Measure every feasible support of one site of `dense` (left unchanged)
    on token windows; rows are appended to `log` (a .jsonl; supports already
    there are skipped) and the table goes to the .md beside it."""
    from ..adapters import adapter_for
    from ..apply import PruneError
    from ..data import Calibration
    from ..evaluate import evaluate
    from ..evaluation import kl_divergence, perplexity
    from ..extract import extract
    from ..loss_select import loss_curvature
    from ..registry import solve
    from ..surgery import remove_groups
    from exact.enumerate import n_supports, supports

    adapter = adapter_for(dense)
    adapter.check_structure(structure)
    adapter.check_layer(layer)
    cal = calibration if isinstance(calibration, Calibration) else Calibration(calibration)
    loss_set = cal.input_ids[: max(1, min(loss_windows, cal.n_windows))]
    (inst,) = extract(dense, cal, structures=(structure,), layers=[layer], keep=1.0 - sparsity, damping=damping,
                      progress=False, model_name=model_name)
    count = n_supports(inst)
    if count > max_supports:
        raise PruneError(f"layer {layer} {structure} at {sparsity:.0%} has {count} feasible supports, more than "
                         f"max_supports={max_supports}: pick a site with fewer groups or raise --max-supports")
    picks = {name: [int(g) for g in solve(inst, name).keep] for name in solvers}
    stem = Path(log).stem
    settings = {"model": model_name, "layer": layer, "structure": structure, "sparsity": sparsity,
                "damping": damping, "calibration": list(cal.input_ids.shape), "loss_windows": int(loss_set.shape[0]),
                "evaluation": list(evaluation.shape),
                "validation": None if validation is None else list(validation.shape)}
    done = _supports(log)
    halves = None  # the cross-fitted loss: each half's refit, scored on the other half
    if cal.n_windows >= 2:
        halves = (cal.input_ids[: cal.n_windows // 2], cal.input_ids[cal.n_windows // 2:])
        folds = [extract(dense, Calibration(h), structures=(structure,), layers=[layer], keep=1.0 - sparsity,
                         damping=damping, progress=False)[0] for h in halves]

    def pruned(S: tuple[int, ...], weights: np.ndarray):
        """A copy of the dense model with only this site pruned to S, these refit weights."""
        model = copy.deepcopy(dense)
        remove_groups(model, adapter_for(model).site(structure, layer), np.asarray(S), weights)
        return model

    def crossfit_loss(S: tuple[int, ...]) -> float | None:
        if halves is None:
            return None
        return float(np.mean([_mean_loss(pruned(S, evaluate(folds[a], S).weights), halves[1 - a]) for a in (0, 1)]))

    curvature = []  # the loss gradients at the site's consumer, taken once when a row needs them

    def loss_estimate(S: tuple[int, ...]) -> float:
        if not curvature:
            curvature.append(loss_curvature(dense, [inst.meta["module"]], cal.batches(4))[inst.meta["module"]])
        return curvature[0].estimate(inst, evaluate(inst, S).weights)

    late = {"calibration_kl": lambda S, model: kl_divergence(dense, model, loss_set),
            "crossfit_loss": lambda S, model: crossfit_loss(S),
            "loss_estimate": lambda S, model: loss_estimate(S)}  # added to rows measured before they existed
    dense_row = next((r for r in _rows(log) if r.get("support") is None and "dense_perplexity" in r), None)
    if dense_row is not None and dense_row.get("settings") != settings:
        raise PruneError(f"{log} holds rows measured with other settings ({dense_row.get('settings')}): "
                         "give another --out, or remove the file to measure again")
    if dense_row is None:
        dense_row = {"support": None, "settings": settings, "dense_perplexity": perplexity(dense, evaluation),
                     "dense_validation_perplexity": perplexity(dense, validation) if validation is not None else None,
                     "dense_calibration_loss": _mean_loss(dense, loss_set)}
        _append(log, dense_row)
    for S in supports(inst):
        S = tuple(int(g) for g in S)
        missing = [k for k in late if k not in done.get(S, {}) and not (k == "crossfit_loss" and halves is None)]
        if S in done and not missing:
            continue
        t = time.perf_counter()
        ev = evaluate(inst, S)
        model = pruned(S, ev.weights)
        if S in done:  # measured before these criteria existed: add them (a row merged by support)
            _append(log, {"support": list(S), **{k: late[k](S, model) for k in missing}})
            print(f"{stem} {list(S)}: {', '.join(missing)} added ({time.perf_counter() - t:.0f} s)", flush=True)
            continue
        row = {"support": list(S), "err": ev.err, "calibration_loss": _mean_loss(model, loss_set),
               **{k: late[k](S, model) for k in late},
               "validation_perplexity": perplexity(model, validation) if validation is not None else None,
               "perplexity": perplexity(model, evaluation)}
        row["seconds"] = time.perf_counter() - t
        _append(log, row)
        print(f"{stem} {list(S)}: err {row['err']:.5f}, calibration loss {row['calibration_loss']:.4f}, "
              f"evaluation perplexity {row['perplexity']:.3f} ({row['seconds']:.0f} s)", flush=True)
        del model
    rows = list(_supports(log).values())
    if validation is not None:  # the calibration refit scored on the validation windows' Gram matrix (cheap)
        (held_out,) = extract(dense, Calibration(validation), structures=(structure,), layers=[layer],
                              keep=1.0 - sparsity, damping=damping, progress=False)
        for r in rows:
            r["validation_err"] = held_out_err(held_out, evaluate(inst, r["support"]).weights)
    summary = summarize(rows, picks)
    summary.update({"model": model_name or type(dense).__name__, "layer": layer, "structure": structure,
                    "sparsity": sparsity, "supports": count, "nsamples": cal.n_windows, "seq_len": cal.seq_len,
                    "eval_windows": int(evaluation.shape[0]),
                    "validation_windows": 0 if validation is None else int(validation.shape[0]),
                    "loss_windows": int(loss_set.shape[0]), "damping": damping, "dense": dense_row,
                    "machine": machine_line()})
    text = _markdown(rows, summary)
    atomic_write(Path(log).with_suffix(".md"), lambda fh: fh.write(text))
    return summary


def _supports(log: Path) -> dict[tuple[int, ...], dict]:
    """The measured supports of `log`, each row merged with the rows that
    later added criteria to it (by support, in file order)."""
    out: dict[tuple[int, ...], dict] = {}
    for r in _rows(log):
        if r.get("support") is not None:
            out.setdefault(tuple(r["support"]), {}).update(r)
    return {S: r for S, r in out.items() if "perplexity" in r}


def held_out_err(instance, weights: np.ndarray) -> float:
    """err of fixed weights on another instance of the same site (same target
    weights W_hat, another Gram matrix H): tr(D'HD) / tr(W_hat'H W_hat), D = W - W_hat."""
    D = weights - instance.W
    return float(np.einsum("ij,ij->", D, instance.H @ D) / np.einsum("ij,ij->", instance.W, instance.H @ instance.W))


def summarize(rows: list[dict], picks: dict[str, list[int]]) -> dict:
    """Spearman correlation of each criterion with the evaluation perplexity,
    and the evaluation rank of the support each criterion and solver picks."""
    from scipy.stats import rankdata, spearmanr

    ppl = [r["perplexity"] for r in rows]
    eval_rank = rankdata(ppl)  # 1..n, ties share their mean rank
    by_support = {tuple(r["support"]): (r, rank) for r, rank in zip(rows, eval_rank)}
    spearman, picked = {}, {}
    for key, _ in CRITERIA:
        if any(r.get(key) is None for r in rows):
            continue
        values = [r[key] for r in rows]
        spearman[key] = float(spearmanr(values, ppl)[0]) if len(rows) > 2 else None
        best = int(np.argmin(values))
        picked[key] = {"support": rows[best]["support"], "perplexity": ppl[best], "rank": float(eval_rank[best])}
    for name, S in picks.items():
        row, rank = by_support.get(tuple(S), (None, None))
        if row is not None:
            picked[name] = {"support": S, "perplexity": row["perplexity"], "rank": float(rank)}
    best = int(np.argmin(ppl))
    picked["best on the evaluation half"] = {"support": rows[best]["support"], "perplexity": ppl[best], "rank": 1.0}
    return {"spearman": spearman, "picked": picked}


def _markdown(rows: list[dict], summary: dict) -> str:
    n = len(rows)
    dense = summary["dense"]
    lines = [f"# Layer-wise err against the model: {summary['model']} layer {summary['layer']} "
             f"{summary['structure']} at {summary['sparsity']:.0%}", "",
             f"Machine: {summary['machine']}. Command: `osscar-opt bench-supports --model {summary['model']} "
             f"--layer {summary['layer']} --structure {summary['structure']} --sparsity {summary['sparsity']:g}`.",
             f"Only this site is pruned, on the dense model; each of its {summary['supports']} feasible supports "
             f"is written back with its refit weights (damping {summary['damping']:g}; pydoc calibration "
             f"{summary['nsamples']} x {summary['seq_len']} tokens). Calibration loss and KL from the dense "
             f"model: the first {summary['loss_windows']} calibration windows; cross-fitted loss: refit on "
             f"each half of the calibration windows, scored on the other half; estimated loss change: "
             f"apply(select='loss')'s second-order estimate from the calibration loss gradients; validation: "
             f"{summary['validation_windows']} calibration-half windows after the calibration ones; evaluation: "
             f"{summary['eval_windows']} windows "
             f"of the evaluation half.",
             f"Dense model: evaluation perplexity {dense['dense_perplexity']:.3f}"
             + (f", validation {dense['dense_validation_perplexity']:.3f}"
                if dense.get("dense_validation_perplexity") is not None else "")
             + f", calibration loss {dense['dense_calibration_loss']:.4f}.", "",
             "| criterion | Spearman with evaluation perplexity |", "|---|---|"]
    for key, label in CRITERIA:
        if key in summary["spearman"]:
            lines.append(f"| {label} | {summary['spearman'][key]:+.2f} |")
    lines += ["", f"The support each criterion or solver picks, and its evaluation rank among the {n}:", "",
              "| picked by | support | evaluation perplexity | rank |", "|---|---|---|---|"]
    labels = dict(CRITERIA)
    for key, p in summary["picked"].items():
        lines.append(f"| {labels.get(key, key)} | {p['support']} | {p['perplexity']:.3f} | {p['rank']:g} |")
    lines += ["", "Every support, by evaluation perplexity:", "",
              "| support | err | validation err | calibration loss | calibration KL | cross-fitted loss | "
              "estimated loss change | validation perplexity | evaluation perplexity |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["perplexity"]):
        val = "-" if r.get("validation_perplexity") is None else f"{r['validation_perplexity']:.3f}"
        verr = "-" if r.get("validation_err") is None else f"{r['validation_err']:.5f}"
        kl = "-" if r.get("calibration_kl") is None else f"{r['calibration_kl']:.5f}"
        xfit = "-" if r.get("crossfit_loss") is None else f"{r['crossfit_loss']:.4f}"
        est = "-" if r.get("loss_estimate") is None else f"{r['loss_estimate']:+.5f}"
        lines.append(f"| {r['support']} | {r['err']:.5f} | {verr} | {r['calibration_loss']:.4f} | {kl} | {xfit} | "
                     f"{est} | {val} | {r['perplexity']:.3f} |")
    return "\n".join(lines) + "\n"
