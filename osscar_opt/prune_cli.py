"""`osscar-opt prune`: load, measure, prune, measure again, save."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import CliError


def _sparsity(args: argparse.Namespace, value: float) -> Any:
    if args.heads is None and args.neurons is None:
        return value
    out = {"default": value}
    if args.heads is not None:  # for the attention structure pruned (heads, query-heads or kv-groups)
        from .apply import ATTENTION_STRUCTURES

        chosen = _structures(args) or ["heads"]
        for name in [s for s in chosen if s in ATTENTION_STRUCTURES] or ["heads"]:
            out[name] = args.heads
    if args.neurons is not None:
        out["neurons"] = args.neurons
    return out


def _names(text: str | None) -> list[str]:
    """The names of a comma-separated flag, blanks left out."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _structures(args: argparse.Namespace) -> list[str] | None:
    return _names(args.structures) or None


def _compared(args: argparse.Namespace) -> list[str]:
    """--compare's solvers (a namespace built without the flag compares none)."""
    return _names(getattr(args, "compare", None))


def _solver_params(args: argparse.Namespace) -> dict:
    from .cli import parse_params

    return parse_params(args.solver, args.param)


def measure(model, tokenizer, kind: str, args: argparse.Namespace, reference=None, speed: bool = True) -> dict:
    from .evaluation import evaluate_model

    return evaluate_model(model, tokenizer, kind=kind, source="pydoc" if args.calib == "pydoc" else args.calib,
                          n_windows=args.eval_windows, seq_len=args.seq_len, reference=reference,
                          speed=speed and not args.no_speed, device=args.device)


def prune_once(args: argparse.Namespace, sparsity: float, dense: dict | None = None) -> dict:
    import torch

    from . import data, models
    from .apply import apply
    from .models import EMBEDDED

    model, tok = models.load(args.model, dtype=torch.float32)
    kind = EMBEDDED[args.model].kind if args.model in EMBEDDED else (
        "causal-lm" if hasattr(model, "lm_head") else "encoder")
    if dense is None:
        dense = measure(model, tok, kind, args, speed=False)
    seq_len = min(args.seq_len, getattr(model.config, "max_position_embeddings", args.seq_len))
    if kind == "encoder":  # sentence-like inputs, padded tokens masked out of the Gram matrices
        cal = data.encoder_calibration(tok, args.calib, args.nsamples, seq_len, seed=args.calib_seed)
    else:
        cal = data.calibration(tok, args.calib, args.nsamples, seq_len, seed=args.calib_seed)
    select = getattr(args, "select", "err")
    validation = None
    if select == "validation":  # calibration-half windows / paragraphs disjoint from the calibration ones
        validation = held_out(tok, kind, args.calib, validation_windows(args), args.nsamples, seq_len,
                              args.calib_seed)
    structures = _structures(args)
    report = apply(model, cal, _sparsity(args, sparsity), solver=args.solver, structures=structures,
                   sequential=not args.dense_activations, damping=args.damping, device=args.device,
                   targets=args.targets, target_damping=args.target_damping,
                   compare=_compared(args), select=select, validation=validation,
                   validate=_validated(args),
                   **_solver_params(args))
    pruned = measure(model, tok, kind, args, reference=dense.get("embeddings"), speed=False)
    if not args.no_speed:
        speeds = _speeds(args, model, tok, kind, seq_len)
        if speeds is not None:
            dense = dict(dense, speed=speeds[0])
            pruned["speed"] = speeds[1]
        else:
            pruned["speed_skipped"] = f"the dense and pruned models do not fit on {args.device} together"
    return {"model": model, "tokenizer": tok, "kind": kind, "dense": dense, "pruned": pruned, "report": report,
            "sparsity": sparsity}


def _speeds(args: argparse.Namespace, pruned_model, tok, kind: str, seq_len: int) -> tuple[dict, dict] | None:
    """Dense and pruned latency measured in alternation (a fresh dense copy);
    None, said on stderr, when the two do not fit on the device together."""
    import torch
    from torch import nn

    from . import data, models
    from .evaluation import compare_latency
    from .placement import fits_on, model_bytes

    dense_model, _ = models.load(args.model, dtype=torch.float32)
    if args.device is not None:
        both = nn.ModuleList([dense_model, pruned_model])
        if not fits_on(both, args.device):
            print(f"speed not measured: the dense and pruned models ({model_bytes(both) / 2**30:.1f} GB) do not fit "
                  f"on {args.device} together; pass --no-speed to skip this check", file=sys.stderr)
            return None
        both.to(args.device)
    if kind == "causal-lm":
        x = data.windows(tok, "pydoc" if args.calib == "pydoc" else args.calib, "evaluation", 1, seq_len)
        return compare_latency(dense_model, pruned_model, x, new_tokens=32)
    from .evaluation import held_out_paragraphs

    texts = held_out_paragraphs("pydoc")[:32]
    enc = tok(texts, padding="max_length", truncation=True, max_length=min(seq_len, 128), return_tensors="pt")
    return compare_latency(dense_model, pruned_model, enc["input_ids"], new_tokens=0)


def _summary(run: dict) -> dict:
    dense, pruned, report = run["dense"], run["pruned"], run["report"]
    out = {"sparsity": run["sparsity"], "params_dense": dense["parameters"], "params_pruned": pruned["parameters"],
           "prune_seconds": report.seconds, "solve_seconds": report.solve_seconds, "mean_err": report.mean_err}
    if report.comparison:
        out["comparison"] = report.comparison
    if run["kind"] == "causal-lm":
        out.update({"ppl_dense": dense["perplexity"], "ppl_pruned": pruned["perplexity"]})
    if run["kind"] == "encoder":
        out["fidelity"] = pruned.get("fidelity")
    if "speed_skipped" in pruned:
        out["speed_skipped"] = pruned["speed_skipped"]
    if pruned.get("offloaded"):
        out["evaluated_offloaded"] = True
    if "speed" in dense and "speed" in pruned:
        out["prefill_speedup"] = dense["speed"]["prefill_seconds"] / pruned["speed"]["prefill_seconds"]
        if "generate_tokens_per_second" in pruned["speed"]:
            out["generate_speedup"] = (pruned["speed"]["generate_tokens_per_second"]
                                       / dense["speed"]["generate_tokens_per_second"])
    return out


def _print(summary: dict) -> None:
    line = (f"sparsity {summary['sparsity']:.2f}: parameters {summary['params_dense']:,} -> {summary['params_pruned']:,}"
            f" ({100 * (1 - summary['params_pruned'] / summary['params_dense']):.1f}% fewer)")
    if "ppl_dense" in summary:
        line += f", perplexity {summary['ppl_dense']:.2f} -> {summary['ppl_pruned']:.2f}"
    if summary.get("fidelity") is not None:
        line += f", embedding cosine fidelity {summary['fidelity']:.4f}"
    if "prefill_speedup" in summary:
        line += f", prefill speed-up {summary['prefill_speedup']:.2f}x"
    if "generate_speedup" in summary:
        line += f", generation speed-up {summary['generate_speedup']:.2f}x"
    line += f"; pruning took {summary['prune_seconds']:.0f} s"
    print(line)
    for name, c in summary.get("comparison", {}).items():
        print(f"  err against {name} on the same instances: lower at {c['lower']} sites, equal at {c['equal']}, "
              f"higher at {c['higher']}" + (f", {name} failed at {c['failed']}" if c["failed"] else ""))


def _check_out(out: Path, sweep: bool) -> None:
    """--out can be written, and holds no model this command did not write (checked before any work)."""
    from .io import writable_folder

    if not sweep and (out / "model").exists() and not (out / "report.json").exists():
        raise CliError(f"{out / 'model'} exists and was not written by `osscar-opt prune`: choose another --out")
    writable_folder(out)


def _write(args: argparse.Namespace, out: Path, rows: list, dense: dict, last: dict, final: bool) -> None:
    """report.json and report.md for the runs so far (after every point of a sweep), the model at the end."""
    from .io import atomic_write
    from .library import write_json_atomic
    from .surgery import save_pruned

    if final and not args.sweep:
        save_pruned(last["model"], last["tokenizer"], out / "model", overwrite=True)
    report = last["report"].to_dict()
    write_json_atomic(out / "report.json", {"summary": rows, "last_report": report,
                                            "dense": {k: v for k, v in dense.items() if k != "embeddings"}})
    cal = report["calibration"]
    unit = "paragraphs" if cal.get("kind") == "paragraphs" else "windows"
    md = [f"# osscar-opt prune: {args.model}", "",
          f"solver `{report['solver']}`, calibration {cal['source']} {cal['windows']} {unit} x {cal['seq_len']} "
          f"tokens ({cal['tokens']:,} real tokens), {'dense' if args.dense_activations else 'sequential'} "
          f"activations, {report['targets']} targets", ""]
    head = "| sparsity | parameters | " + ("perplexity | " if "ppl_pruned" in rows[0] else "fidelity | ") + \
        "prefill speed-up | prune s |"
    md += [head, "|---|---|---|---|---|"]
    for r in rows:
        q = f"{r['ppl_pruned']:.2f}" if "ppl_pruned" in r else f"{r.get('fidelity', float('nan')):.4f}"
        speed = f"{r['prefill_speedup']:.2f}x" if "prefill_speedup" in r else "- (not measured)"
        md.append(f"| {r['sparsity']:.2f} | {r['params_pruned']:,} | {q} | {speed} | {r['prune_seconds']:.0f} |")
    md += ["", last["report"].to_markdown()]
    atomic_write(out / "report.md", lambda fh: fh.write("\n".join(md) + "\n"))


VALIDATION_WINDOWS = 40  # --select validation's held-out windows by default


def _validated(args: argparse.Namespace) -> tuple[str, ...] | None:
    """--validate: the structures --select validation checks (None: apply's default, the heads)."""
    text = getattr(args, "validate", None)
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())


def validation_windows(args: argparse.Namespace) -> int:
    """prune's --validation-windows: VALIDATION_WINDOWS unless given."""
    n = getattr(args, "validation_windows", None)
    return VALIDATION_WINDOWS if n is None else n


def check_select(model: str, select: str, args: argparse.Namespace | None = None) -> None:
    """--select loss/validation need a causal LM: refused for an embedded encoder before it loads;
    with `args` (prune's), --select validation needs held-out windows disjoint from the calibration."""
    from .models import EMBEDDED

    if select == "loss" and model in EMBEDDED and EMBEDDED[model].kind != "causal-lm":
        raise CliError(f"--select {select} scores heads by a causal LM's next-token loss and {model} is an "
                       f"{EMBEDDED[model].kind}: leave --select out")
    if args is None:
        return
    for flag, value in (("--validation-windows", getattr(args, "validation_windows", None)),
                        ("--validate", getattr(args, "validate", None))):
        if select != "validation" and value is not None:
            raise CliError(f"{flag} belongs to --select validation: add --select validation, or leave it out")
    if select == "validation" and validation_windows(args) < 1:
        raise CliError("--select validation needs at least one held-out window: --validation-windows 40")


def held_out(tok: Any, kind: str, source: str, n: int, nsamples: int, seq_len: int, seed: int | None) -> Any:
    """The held-out inputs of --select validation: n calibration-half windows
    (encoders: paragraphs) sharing nothing with the `nsamples` calibration
    ones drawn with `seed` (`data.validation_windows`)."""
    from . import data

    if kind == "encoder":
        return data.validation_paragraphs(tok, source, n, min(seq_len, 128), nsamples * data.PARAGRAPHS_PER_SAMPLE,
                                          seed)
    return data.Calibration(data.validation_windows(tok, source, n, seq_len, nsamples, seed), source=source,
                            tokenizer_name=getattr(tok, "name_or_path", None))


def prune_command(args: argparse.Namespace) -> int:
    from . import data
    from .apply import check_solver
    from .cli import check_window_counts, sparsity_list
    from .instance import check_damping

    # what can be checked without the model, before minutes of loading and calibration
    check_solver(args.solver, args.device, _solver_params(args))  # the solver, its -p and --device
    for other in _compared(args):
        check_solver(other, args.device, {})
    data.source_text(args.calib)
    check_select(args.model, getattr(args, "select", "err"), args)
    sparsities = sparsity_list(args.sweep, "--sweep") if args.sweep else [args.sparsity]
    for flag, value in (("--sparsity", args.sparsity), ("--heads", args.heads), ("--neurons", args.neurons)):
        if value is not None and not 0.0 <= value < 1.0:
            raise CliError(f"{flag} is the fraction of groups pruned, in [0, 1); got {value}")
    check_window_counts(args)
    check_damping(args.damping)
    out = None if args.out is None else Path(args.out)
    if out is not None:
        _check_out(out, bool(args.sweep))
    rows, dense = [], None
    for i, s in enumerate(sparsities):
        run = prune_once(args, s, dense)
        dense = run["dense"]
        summary = _summary(run)
        rows.append(summary)
        _print(summary)
        if out is not None:  # a sweep keeps every finished point even if a later one fails
            _write(args, out, rows, dense, run, final=i == len(sparsities) - 1)
    if out is not None:
        print(f"wrote {out}/report.json and {out}/report.md" + ("" if args.sweep else f" and the model in {out}/model"))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


__all__ = ["check_select", "prune_command", "prune_once", "measure"]
