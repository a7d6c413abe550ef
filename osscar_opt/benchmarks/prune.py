"""Whole-model pruning sweeps: `osscar-opt bench-prune`.

For each solver and each sparsity (heads and neurons at the same sparsity,
sequential), the embedded model is loaded afresh, pruned with
`osscar_opt.apply` on the pydoc calibration half and measured on the
evaluation half: perplexity for SmolLM2 (DESIGN.md: 32 x 512 calibration and
40 x 512 evaluation tokens, dense 13.76), cosine fidelity of sentence
embeddings to the dense model for MiniLM. Rows are appended to
results/prune_<model>.jsonl as they finish (a rerun skips finished pairs);
results/prune_<model>.md and .png hold the table and the plot.

Damping is a hyperparameter of the problem (the ridge of the Gram
matrices). `--dampings a,b,c --validation-windows N` prunes once per
damping and also measures quality on N validation windows (causal LMs:
perplexity) or N validation paragraphs (encoders: embedding fidelity to the
dense model) of the calibration half, the ones right after those the
calibration uses (disjoint from them and from the evaluation half); the
report then picks, per solver and sparsity, the damping with the best
validation figure and quotes its evaluation figure, so the choice never
looks at the evaluation half.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Sequence

from ..extract import GramHooks
from ..instance import DAMPING, TARGET_DAMPING
from ..io import writable_folder
from . import RESULTS, machine, machine_line

PUBLISHED = {"smollm2-135m": {0.3: 19.70, 0.5: 31.78}}
DEFAULT_SOLVERS = ("osscar", "obs-greedy", "forward", "activation", "magnitude-refit", "iht", "magnitude", "random")


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _label(row: dict, seed: bool = True) -> str:
    """The solver's name, with the damping when it is not the default and the
    calibration seed when the windows were drawn at random (seed=False leaves it out)."""
    damping = row.get("damping", DAMPING)
    extra = [] if damping == DAMPING else [f"damping {damping:g}"]
    if row.get("structures"):
        extra.insert(0, row["structures"])
    targets = row.get("targets", "layer")  # rows older than dense targets are layer-target rows
    ridge = row.get("target_damping")
    if targets != "dense" or ridge != TARGET_DAMPING:  # dense targets, validated ridge: the default, unlabelled
        extra.insert(0, f"{targets} targets" + ("" if targets != "dense" or ridge is None else f" {ridge:g}"))
    if targets == "dense" and row.get("outliers", "dense") != GramHooks.outliers:
        # measured when the correction left out only the tokens massive in the dense model
        extra.append(f"outliers: {row.get('outliers', 'dense')} only")
    if row.get("select", "err") != "err":  # rows measured before `select` existed chose heads by err
        extra.insert(0, f"{','.join(row.get('validate') or ['heads'])} validated" if row["select"] == "validation"
                     else f"heads by {row['select']}")
    if seed and row.get("calib_seed") is not None:
        extra.append(f"calib seed {row['calib_seed']}")
    return row["solver"] + (f" ({', '.join(extra)})" if extra else "")


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by an interrupted run
            continue
    return out


def run(model_name: str = "smollm2-135m", solvers: Sequence[str] = DEFAULT_SOLVERS,
        sparsities: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6), nsamples: int = 32, seq_len: int = 512,
        eval_windows: int = 40, device: str | None = None, out: str | Path | None = None,
        speed_at: float | None = 0.5, damping: float | Sequence[float] = DAMPING,
        calib_seeds: Sequence[int | None] = (None,), structures: Sequence[str] | None = None,
        validation_windows: int = 0, targets: str | None = None, target_damping: float | None = TARGET_DAMPING,
        select: str = "err", validate: Sequence[str] | None = None) -> list[dict]:
    """One pruning per (seed, damping, solver, sparsity), appended to
    prune_<model>.jsonl as it finishes (a rerun skips those done), then the
    tables and plot.
    damping: one value or several (rows other than the default are labelled).
    structures: pruned instead of the architecture's default (rows labelled
    with them, e.g. "osscar (query-heads,neurons)").
    validation_windows: also measure quality on that many calibration-half
    windows (causal LMs: perplexity) or paragraphs (encoders: fidelity)
    sharing nothing with those the calibration uses (consecutive calibration
    only), for choosing the damping without the evaluation half; the same
    inputs, drawn apart from each seed's calibration, are what
    select="validation" scores.
    targets, target_damping, select, validate: apply()'s (rows other than its defaults,
    dense targets with a validated ridge and heads chosen by err, are
    labelled)."""
    import torch

    from .. import data, models
    from ..apply import PruneError, apply
    from ..evaluation import compare_latency, embedding_fidelity, evaluate_model, perplexity, sentence_embeddings
    from ..prune_cli import held_out

    out = Path(out) if out else RESULTS
    writable_folder(out)
    log = out / f"prune_{model_name}.jsonl"
    done = {(_label(r), r["sparsity"]) for r in _rows(log) if r.get("solver")}
    kind = models.EMBEDDED[model_name].kind if model_name in models.EMBEDDED else "causal-lm"
    vkey = "validation_perplexity" if kind == "causal-lm" else "validation_fidelity"
    if select == "validation" and not validation_windows:
        raise PruneError("select='validation' scores its choices on held-out calibration-half windows: give "
                         "validation_windows (--validation-windows 40)")
    if validate is not None and select != "validation":
        raise PruneError("validate names the structures select='validation' checks: add select='validation'")
    validate = None if validate is None else tuple(validate)
    validated = {(_label(r), r["sparsity"]) for r in _rows(log) if r.get(vkey) is not None}
    dense_model, tok = models.load(model_name, dtype=torch.float32, device=device)
    seq = min(seq_len, getattr(dense_model.config, "max_position_embeddings", seq_len))
    dense = evaluate_model(dense_model, tok, kind=kind, n_windows=eval_windows, seq_len=seq)
    reference = dense.get("embeddings")
    if not any(r.get("solver") == "dense" for r in _rows(log)):
        _append(log, {"solver": "dense", "sparsity": 0.0, "parameters": dense["parameters"],
                      "perplexity": dense.get("perplexity"), "fidelity": 1.0 if kind == "encoder" else None})
    def calibration_for(seed: int | None):
        if kind == "encoder":  # sentence-like inputs, padded tokens masked out of the Gram matrices
            return data.encoder_calibration(tok, "pydoc", nsamples, seq, seed=seed)
        return data.calibration(tok, "pydoc", nsamples, seq, seed=seed)

    evaluation = data.windows(tok, "pydoc", "evaluation", 1, seq) if kind == "causal-lm" else None
    held: dict = {}

    def validation_for(seed: int | None):
        """The calibration-half windows (encoders: paragraph texts and their dense
        embeddings) sharing nothing with seed's calibration, and the same as the
        inputs select="validation" scores; None without validation_windows."""
        if not validation_windows:
            return None, None, None
        if seed not in held:
            scored = held_out(tok, kind, "pydoc", validation_windows, nsamples, seq, seed)
            if kind == "causal-lm":
                held[seed] = scored.input_ids, None, scored
            else:
                texts = data.validation_paragraph_texts("pydoc", validation_windows,
                                                        nsamples * data.PARAGRAPHS_PER_SAMPLE, seed)
                held[seed] = texts, sentence_embeddings(dense_model, tok, texts), scored
        return held[seed]

    dampings = [float(damping)] if isinstance(damping, (int, float)) else [float(x) for x in damping]
    targets = targets or "dense"  # what apply() picks for the embedded models (sequential transformers)
    for seed, damping, solver, s in itertools.product(calib_seeds, dampings, solvers, sparsities):
        tag = ",".join(structures) if structures else None
        label = _label({"solver": solver, "damping": damping, "calib_seed": seed, "structures": tag,
                        "targets": targets, "target_damping": target_damping, "outliers": GramHooks.outliers,
                        "select": select, "validate": validate})
        if (label, s) in (done if not validation_windows or seed is not None else validated):
            continue
        cal = calibration_for(seed)
        validation, validation_reference, scored = validation_for(seed)
        model, _ = models.load(model_name, dtype=torch.float32, device=device)
        t = time.perf_counter()
        report = apply(model, cal, s, solver=solver, device=device, progress=False, damping=damping,
                       structures=structures, targets=targets, target_damping=target_damping, select=select,
                       validation=scored if select == "validation" else None,
                       validate=validate)
        seconds = time.perf_counter() - t
        res = evaluate_model(model, tok, kind=kind, n_windows=eval_windows, seq_len=seq, reference=reference)
        row = {"solver": solver, "sparsity": s, "damping": damping, "calib_seed": seed, "structures": tag,
               "targets": report.targets, "target_damping": report.target_damping,
               "outliers": GramHooks.outliers if report.targets == "dense" else None,
               "select": report.select, "validate": validate, "parameters": res["parameters"],
               "prune_seconds": seconds, "solve_seconds": report.solve_seconds, "mean_err": report.mean_err,
               "perplexity": res.get("perplexity"), "fidelity": res.get("fidelity")}
        if report.validation is not None:  # select="validation": the sites checked and those written from the start
            row["selection"] = {k: report.validation[k] for k in ("structures", "sites", "moved", "dense_score")}
        if validation is not None and seed is None:  # the damping choice (consecutive calibration only)
            if kind == "causal-lm":
                row[vkey] = perplexity(model, validation)
            else:
                row[vkey] = embedding_fidelity(validation_reference, sentence_embeddings(model, tok, validation))
            row["validation_windows"] = len(validation)
        if speed_at is not None and abs(s - speed_at) < 1e-9 and solver == solvers[0] and kind == "causal-lm" \
                and seed is None:
            row["speed_dense"], row["speed_pruned"] = compare_latency(dense_model, model, evaluation)
        _append(log, row)
        print(f"{model_name} {label:<16} sparsity {s:.2f}: " + (
            f"perplexity {row['perplexity']:.2f}" if row["perplexity"] is not None else
            f"fidelity {row['fidelity']:.4f}") + f" ({seconds:.0f} s)")
        del model
    rows = _rows(log)
    _write(model_name, kind, rows, out)
    return rows


def _seed_table(rows: list[dict], metric: str) -> list[str]:
    """Mean and spread over calibration draws (windows at random positions, one seed each)."""
    import numpy as np

    labels = list(dict.fromkeys(_label(r, seed=False) for r in rows))
    sparsities = sorted({r["sparsity"] for r in rows})
    seeds = sorted({r["calib_seed"] for r in rows})
    lines = ["", f"Calibration drawn at random positions of the calibration half (`--calib-seeds "
             f"{','.join(str(x) for x in seeds)}`): {metric} per seed, then mean +- standard deviation.", "",
             "| solver | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |", "|---|" + "---|" * len(sparsities)]
    fmt = "{:.2f}" if metric == "perplexity" else "{:.4f}"
    for v in labels:
        cells = []
        for s in sparsities:
            vals = [r[metric] for r in rows if _label(r, seed=False) == v and r["sparsity"] == s and r.get(metric) is not None]
            if not vals:
                cells.append("-")
                continue
            each = " / ".join(fmt.format(x) for x in vals)
            cells.append(f"{each}; {fmt.format(np.mean(vals))} +- {fmt.format(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def _damping_table(rows: list[dict], metric: str) -> list[str]:
    """Per solver and sparsity, the damping with the best validation figure
    (calibration-half windows or paragraphs) and its evaluation figure."""
    vkey, unit = f"validation_{metric}", "windows" if metric == "perplexity" else "paragraphs"
    pick = min if metric == "perplexity" else max
    fmt = "{:.2f}" if metric == "perplexity" else "{:.4f}"
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((_label({**r, "damping": DAMPING}), r["sparsity"]), []).append(r)
    table, n_val = [], 0
    for (label, sp), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        latest = {r.get("damping", DAMPING): r for r in rs}  # a rerun's row replaces the earlier one
        if len(latest) < 2:  # one damping: nothing was chosen (rows measured on validation windows for another end)
            continue
        n_val = max([n_val] + [r.get("validation_windows", 0) for r in latest.values()])
        ordered = sorted(latest.values(), key=lambda r: r.get("damping", DAMPING))
        chosen = pick(ordered, key=lambda r: r[vkey])
        cells = []
        for r in ordered:
            text = f"{r.get('damping', DAMPING):g}: {fmt.format(r[vkey])} / {fmt.format(r[metric])}"
            cells.append(f"**{text}**" if r is chosen else text)
        table.append(f"| {label} | {sp:.0%} | {'; '.join(cells)} | {chosen.get('damping', DAMPING):g} | "
                     f"{fmt.format(chosen[metric])} |")
    if not table:
        return []
    return ["", f"Damping chosen on {n_val} validation {unit} of the calibration half (after the calibration "
            f"{unit}, never the evaluation half): validation / evaluation {metric} per damping tried, the "
            "chosen one in bold.", "",
            "| solver | sparsity | dampings tried: validation / evaluation | chosen | evaluation at the chosen |",
            "|---|---|---|---|---|", *table]


def _write(model_name: str, kind: str, rows: list[dict], out: Path) -> None:
    metric = "perplexity" if kind == "causal-lm" else "fidelity"
    dense = next((r for r in rows if r["solver"] == "dense"), None)
    seeded = [r for r in rows if r["solver"] != "dense" and r.get("calib_seed") is not None]
    rows = [r for r in rows if r.get("calib_seed") is None]
    solvers = list(dict.fromkeys(_label(r) for r in rows if r["solver"] != "dense"))
    sparsities = sorted({r["sparsity"] for r in rows if r["solver"] != "dense"})
    table = {(_label(r), r["sparsity"]): r for r in rows}
    lines = [f"# Whole-model pruning: {model_name}", "",
             f"Machine: {machine_line(machine())}. Command: `osscar-opt bench-prune --model {model_name}`.",
             "Heads and neurons at the same sparsity, sequential, pydoc calibration half; "
             f"{metric} on the evaluation half" + (f" (dense {dense[metric]:.2f})" if dense and dense.get(metric) else "") + ".",
             "", "| solver | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "|---|" + "---|" * len(sparsities)]
    best = {}
    for s in sparsities:
        vals = [(table[(v, s)][metric], v) for v in solvers if (v, s) in table and table[(v, s)][metric] is not None]
        if vals:
            best[s] = (min if metric == "perplexity" else max)(vals)[1]
    for v in solvers:
        cells = []
        for s in sparsities:
            r = table.get((v, s))
            if r is None or r.get(metric) is None:
                cells.append("-")
            else:
                text = f"{r[metric]:.2f}" if metric == "perplexity" else f"{r[metric]:.4f}"
                cells.append(f"**{text}**" if best.get(s) == v else text)
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    pub = PUBLISHED.get(model_name)
    if pub:
        lines += ["", "Published OSSCAR code: " + ", ".join(f"{p:.2f} at {s:.0%}" for s, p in pub.items()) + "."]
        if model_name == "smollm2-135m":
            lines += ["", "Head counts: SmolLM2 has 9 query heads in 3 KV groups. `heads` keeps the same number in "
                      "every group (round(3 x keep) each): 6 of 9 at 20-50%, 3 at 60%. The published code keeps "
                      "9 x keep heads anywhere, rounded down (its reference o_proj instance keeps 4 of 9 at 50%): "
                      "6 at 30%, 4 at 50%. Rows labelled `query-heads,neurons` keep "
                      "round(9 x keep) anywhere (4 at 50%, KV heads duplicated where groups differ), the "
                      "published head count."]
    validated = [r for r in rows if r.get(f"validation_{metric}") is not None]
    if validated:
        lines += _damping_table(validated, metric)
    if seeded:
        lines += _seed_table(seeded, metric)
    for r in rows:
        if "speed_pruned" in r:
            d, p = r["speed_dense"], r["speed_pruned"]
            lines += ["", f"Speed at {r['sparsity']:.0%} ({_label(r)}, CPU, batch 1 x {d['seq_len']} tokens): prefill "
                      f"{d['prefill_seconds'] * 1000:.1f} ms -> {p['prefill_seconds'] * 1000:.1f} ms "
                      f"({d['prefill_seconds'] / p['prefill_seconds']:.2f}x); generation "
                      f"{d.get('generate_tokens_per_second', 0):.1f} -> {p.get('generate_tokens_per_second', 0):.1f} tokens/s; "
                      f"parameters {r['parameters']:,}; pruning took {r['prune_seconds']:.0f} s."]
    (out / f"prune_{model_name}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8.5, 4.2))
        for v in solvers:  # sweeps only: runs at one or two sparsities stay in the tables
            pts = [(s, table[(v, s)][metric]) for s in sparsities if (v, s) in table and table[(v, s)][metric]]
            if len(pts) >= 3:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=v)
        if dense and dense.get(metric):
            ax.axhline(dense[metric], color="k", ls=":", label="dense")
        if pub:
            ax.plot(list(pub), list(pub.values()), "kx", ms=9, label="published OSSCAR")
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("sparsity (heads and neurons)")
        ax.set_ylabel(metric)
        ax.set_title(model_name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(out / f"prune_{model_name}.png", dpi=120)
        plt.close(fig)
    except ImportError:
        pass
