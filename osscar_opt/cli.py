"""The `osscar-opt` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import CliError, OsscarError
from .instance import DAMPING, DEFAULT_TARGETS, SELECT, TARGET_DAMPING, TARGETS

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], Handler], str]] = {}


def command(name: str, help: str):
    """Register a subcommand: the decorated function adds its arguments to the
    parser it is given and returns the handler."""

    def wrap(build: Callable[[argparse.ArgumentParser], Handler]):
        _COMMANDS[name] = (build, help)
        return build

    return wrap


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o: Any):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _short_list(values: Sequence[int], limit: int = 24) -> str:
    values = [int(v) for v in values]
    if len(values) <= limit:
        return "[" + ", ".join(map(str, values)) + "]"
    head = ", ".join(map(str, values[: limit // 2]))
    tail = ", ".join(map(str, values[-limit // 4 :]))
    return f"[{head}, ... {len(values) - limit // 2 - limit // 4} more ..., {tail}]"


def parse_params(solver: str, items: Sequence[str]) -> dict:
    """Solver parameters from repeated NAME=VALUE flags, typed by its Params
    (for a solver per structure, "heads=obs-greedy+neurons=osscar", by the
    first of its solvers that has the parameter)."""
    from .apply import declared_params, parse_solver
    from .registry import coerce_param, get_solver

    spec = parse_solver(solver)
    classes = [get_solver(n) for n in dict.fromkeys([spec] if isinstance(spec, str) else spec.values())]
    params = {}
    for item in items:
        if "=" not in item:
            raise OsscarError(f"solver parameters are NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        cls = next((c for c in classes if key.strip() in declared_params(c)), classes[0])
        params[key.strip()] = coerce_param(cls, key.strip(), value.strip())
    return params


# ----------------------------------------------------------------- solve
@command("solve", "solve an instance file with a registered solver")
def _solve_args(p: argparse.ArgumentParser):
    p.add_argument("file", type=Path, help="instance file (.npz)")
    p.add_argument("--solver", default="osscar", help="solver name (see `osscar-opt solvers`)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep", type=int, help="number of groups to keep (default: the file's keep)")
    g.add_argument("--sparsity", type=float, help="fraction of groups to prune, e.g. 0.5")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds for the timed solve")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a solver parameter, repeatable (see `osscar-opt solvers`)")
    p.add_argument("--out", type=Path, default=None, help="also write the solution as JSON here")
    p.add_argument("--json", action="store_true", help="print the solution as JSON")

    def run(args: argparse.Namespace) -> int:
        from .io import load_instance, writable_folder
        from .registry import solve

        if args.out is not None:  # checked before the solve, which may run for hours
            if args.out.is_dir():
                raise OsscarError(f"--out {args.out} is a folder: give a file name, e.g. {args.out / 'solution.json'}")
            writable_folder(args.out.parent, "the folder of --out")
        inst = load_instance(args.file)
        if args.keep is not None:
            inst = inst.with_keep(args.keep)
        elif args.sparsity is not None:
            inst = inst.with_keep(inst.keep_for_sparsity(args.sparsity))
        params = parse_params(args.solver, args.param)
        sol = solve(inst, args.solver, device=args.device, time_limit=args.time_limit, **params)
        record = sol.to_dict()
        record["instance"] = {"file": str(args.file), "id": inst.meta.get("id"), **inst.summary()}
        record["instance"].pop("partition", None)
        if args.out is not None:
            _write_json_atomic(args.out, record)
        if args.json:
            _print_json(record)
        else:
            name = inst.meta.get("id") or args.file.name
            print(f"instance  {name}: d={inst.d} m={inst.m} groups={inst.n_groups} keep={inst.keep}")
            print(f"solver    {sol.solver} on {sol.device}  status {sol.status}")
            print(f"err       {sol.err:.6f}   objective {sol.objective:.10g}")
            if sol.err_bound is not None:
                print(f"bound     err >= {sol.err_bound:.6f}   certified gap {100 * sol.gap:.4f}%")
            print(f"time      {sol.seconds:.3f} s (+ {sol.prepare_seconds:.3f} s untimed set-up)")
            print(f"kept      {_short_list(sol.keep)}")
            if sol.message:
                print(f"message   {sol.message}")
        return 0 if sol.status.value != "ERROR" else 1

    return run


def sparsity_list(text: str, flag: str) -> list[float]:
    """Comma-separated sparsities, each in [0, 1)."""
    out = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            value = None
        if value is None or not 0.0 <= value < 1.0:
            raise OsscarError(f"{flag} takes comma-separated sparsities in [0, 1), e.g. 0.1,0.3,0.5; got {item.strip()!r}")
        out.append(value)
    return out


def check_window_counts(args: argparse.Namespace) -> None:
    """--nsamples, --seq-len and --eval-windows of prune and bench-prune are at least 1."""
    for flag, value in (("--nsamples", args.nsamples), ("--seq-len", args.seq_len), ("--eval-windows", args.eval_windows)):
        if value < 1:
            raise OsscarError(f"{flag} must be at least 1, got {value}")


def non_negative_int(text: str) -> int:
    """A non-negative integer flag (--calib-seed, --validation-windows)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"a non-negative integer, got {text!r}")
    return value


def target_damping(text: str) -> float | None:
    """--target-damping: a number >= 0, or 'validated' (None)."""
    if text == "validated":
        return None
    from .instance import check_damping

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number like 0.1 or 'validated', got {text!r}")
    try:
        return check_damping(value)
    except OsscarError:
        raise argparse.ArgumentTypeError(f"a finite number >= 0 or 'validated', got {text!r}")


def _write_json_atomic(path: Path, obj: Any) -> None:
    from .io import atomic_write_json

    atomic_write_json(path, obj, indent=2, default=_json_default)


# ------------------------------------------------------------------ info
@command("info", "describe an instance file")
def _info_args(p: argparse.ArgumentParser):
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from .io import load_instance, read_header

        header = read_header(args.file)
        inst = load_instance(args.file)
        out = {"file": str(args.file), "checksum": header.get("checksum"), "format_version": header.get("version"),
               **inst.summary(), "meta": inst.meta}
        if args.json:
            _print_json(out)
        else:
            for key, value in out.items():
                if key == "meta":
                    for mk, mv in value.items():
                        print(f"meta.{mk:<16} {mv}")
                else:
                    print(f"{key:<21} {value}")
        return 0

    return run


# --------------------------------------------------------------- solvers
@command("solvers", "list the registered solvers and whether they run here")
def _solvers_args(p: argparse.ArgumentParser):
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from .registry import solvers

        rows = solvers()
        if args.json:
            _print_json([r.__dict__ for r in rows])
            return 0
        width = max(len(r.name) for r in rows)
        for r in rows:
            kind = "exact" if r.exact else "heur."
            state = "ok" if r.available else f"unavailable: {r.reason}"
            print(f"{r.name:<{width}}  {kind}  {'/'.join(r.devices):<8}  {state}")
            print(f"{'':<{width}}  {r.description}")
            if r.params:
                print(f"{'':<{width}}  params: {', '.join(r.params)}")
        return 0

    return run


# -------------------------------------------------------------- instances
@command("instances", "the instance library: list, build, verify, catalog")
def _instances_args(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="show the catalog as a table")
    ls.add_argument("--select", default=None, help="tiers (T0,T1), ids or patterns (smollm2-l10-*)")
    ls.add_argument("--json", action="store_true")
    bd = sub.add_parser("build", help="rebuild instances from the embedded models (T2/T3 and missing files)")
    bd.add_argument("--select", "--tier", dest="select", default="T2,T3",
                    help="tiers, ids or patterns to build (default: T2,T3)")
    bd.add_argument("--out", type=Path, default=None, help="folder for rebuilt files (default: instances/build)")
    bd.add_argument("--device", default=None, help="device for the calibration forward passes")
    vf = sub.add_parser("verify", help="check the instance files present and the catalog's best supports and bounds "
                                       "with the fp64 evaluator (nothing is rebuilt)")
    vf.add_argument("--select", default=None, help="tiers, ids or patterns (default: every instance)")
    vf.add_argument("--build-dir", type=Path, default=None, help="folder of rebuilt files (default: instances/build)")
    vf.add_argument("--json", action="store_true", help="print one row per instance as JSON")
    cat = sub.add_parser("catalog", help="maintainers: rebuild every instance and rewrite catalog.json")
    cat.add_argument("--no-solve", action="store_true", help="leave best-known values empty")
    for q in (ls, bd, vf, cat):
        q.add_argument("--catalog", type=Path, default=None, help="catalog file (default: instances/catalog.json)")

    def run(args: argparse.Namespace) -> int:
        from . import library

        if args.action == "catalog":
            return _write_catalog(args)
        catalog = library.Catalog.load(args.catalog)
        entries = catalog.select(args.select)
        if args.action == "list":
            if args.json:
                _print_json(entries)
                return 0
            _print_catalog(entries)
            return 0
        if args.action == "verify":
            return _verify_entries(catalog, entries, args)
        return _build_entries(catalog, entries, args)

    return run


def _print_catalog(entries: list[dict]) -> None:
    head = f"{'id':<36} {'tier':<4} {'d':>5} {'m':>4} {'p':>5} {'b':>3} {'keep':>5} {'best err':>10} {'status':<10} {'lb err':>10}  file"
    print(head)
    print("-" * len(head))
    for e in entries:
        best = e.get("best") or {}
        err = f"{best['err']:.6f}" if "err" in best else "-"
        lb = f"{best['bound_err']:.6f}" if best.get("bound_err") is not None else "-"
        where = e["file"] or f"build/{e['build_file']}"
        print(f"{e['id']:<36} {e['tier']:<4} {e['d']:>5} {e['m']:>4} {e['p']:>5} {e['group_size']:>3} {e['keep']:>5} "
              f"{err:>10} {best.get('status', '-'):<10} {lb:>10}  {where}")
    print(f"{len(entries)} instances")


def _verify_entries(catalog, entries: list[dict], args: argparse.Namespace) -> int:
    """`instances verify`: one line per problem, a summary, exit status 1 if anything does not match."""
    from . import library

    rows = library.verify(catalog, entries, args.build_dir)
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            for problem in r["problems"]:
                print(f"{r['id']}: {problem}")
        ok = [r for r in rows if r["state"] == "ok"]
        proven = sum(1 for r in ok if r["gap"] is not None and r["gap"] <= 1e-9)
        missing = [r["id"] for r in rows if r["state"] == "not built"]
        bad = sum(1 for r in rows if r["state"] == "mismatch")
        rounded = sum(1 for r in ok if r["notes"])
        print(f"{len(rows)} instances: {len(ok)} verified ({proven} with a certified optimum"
              + (f"; {rounded} rebuilt with other rounding, their recorded err reproduced within 1e-9" if rounded else "")
              + f"), {len(missing)} not built, {bad} mismatched")
        if missing:
            tiers = ",".join(sorted({r["tier"] for r in rows if r["state"] == "not built"}))
            print(f"build the missing ones with `osscar-opt instances build --select {tiers}` (or their ids)")
    return 1 if any(r["state"] == "mismatch" for r in rows) else 0


def _build_entries(catalog, entries: list[dict], args: argparse.Namespace) -> int:
    """Rebuild the selected entries and check them against the catalog."""
    from . import library
    from .evaluate import evaluate
    from .io import instance_checksum, writable_folder

    if args.out is not None:
        writable_folder(args.out)
    recipes = [e["recipe"] for e in entries]
    results = library.build(recipes, out_dir=args.out, commit_dir=_scratch_dir(), device=args.device)
    by_id = {e["id"]: e for e in entries}
    worst = 0.0
    same = rebuilt = 0
    for recipe, path, inst in results:
        entry = by_id[inst.meta["id"]]
        if not entry.get("file"):  # committed crops hold a compact W whose last bits depend on the BLAS
            rebuilt += 1
            same += instance_checksum(inst) == entry["checksum"]
        best = entry.get("best") or {}
        if best.get("keep"):
            worst = max(worst, abs(evaluate(inst, best["keep"], weights=False).err - best["err"]))
    print(f"built {len(results)} instances ({len({p for _, p, _ in results})} files); "
          f"{same}/{rebuilt} rebuilt instances match the catalog checksum bit for bit; "
          f"largest err difference on the recorded best supports: {worst:.2e}")
    return 0 if worst <= 1e-9 else 1


def _scratch_dir() -> Path:
    """Committed tiers are rebuilt into a scratch folder, never over the repo's files."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="osscar-committed-"))


def _write_catalog(args: argparse.Namespace) -> int:
    from . import library
    from .registry import solve

    path = Path(args.catalog or library.CATALOG)
    old = {}
    if path.exists():
        old = {e["id"]: e for e in library.Catalog.load(path).entries}
    results = library.build(library.default_recipes(), commit_dir=path.parent,
                            out_dir=path.parent / "build")
    entries = []
    for recipe, file, inst in results:
        entry = library.entry_for(recipe, file, inst, path.parent)
        prev = old.get(entry["id"])
        if prev and prev.get("checksum") == entry["checksum"]:
            entry["best"] = prev.get("best")
        entries.append(entry)
    catalog = library.Catalog(path, {
        "format": "osscar-catalog", "version": 1,
        "defaults": {"calibration": library.CALIBRATION, "damping": library.DAMPING,
                     "model_dtype": library.MODEL_DTYPE},
        "instances": entries,
    })
    if not args.no_solve:
        for (recipe, file, inst), entry in zip(results, entries):
            inst = catalog.instance(entry)
            if entry["best"] is None:
                sol = solve(inst, "osscar", device="cpu")
                catalog.update_best(entry["id"], inst, sol.keep, "osscar")
            if entry["p"] <= 20 and entry["best"].get("status") != "optimal":
                sol = solve(inst, "enumerate", device="cpu")
                catalog.update_best(entry["id"], inst, sol.keep, "enumerate", proven=sol.status.value == "OPTIMAL")
    catalog.save()
    print(f"wrote {path} with {len(entries)} instances")
    return 0


# ----------------------------------------------------------------- prune
@command("prune", "prune a whole model physically and report quality, size and speed")
def _prune_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, minilm-l6, a model folder or a hub id")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of groups pruned in every structure")
    p.add_argument("--heads", type=float, default=None, help="sparsity of attention heads (overrides --sparsity)")
    p.add_argument("--neurons", type=float, default=None,
                   help="sparsity of FFN neurons, every routed expert's in MoE models (overrides --sparsity)")
    p.add_argument("--structures", default=None, help="comma-separated structures (default: the architecture's, "
                   "heads,neurons for most, plus shared-neurons for MoE models with shared experts; Llama also "
                   "query-heads: exact head count, KV heads duplicated where needed; kv-groups)")
    p.add_argument("--solver", default="osscar",
                   help="a registered solver, or one per structure: heads=obs-greedy,neurons=osscar; one layer's "
                        "site takes its own with STRUCTURE[LAYER] and default names the rest: "
                        "'default=osscar,heads[0]=obs-greedy'")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE", help="solver parameter")
    p.add_argument("--compare", default=None, metavar="SOLVERS",
                   help="comma-separated solvers also run on every layer's instance (their supports unused): the "
                        "report gives their err beside the solver's and counts where it is lower")
    p.add_argument("--select", choices=SELECT, default="err",
                   help="how attention heads are chosen: 'err' the solver's support (default); 'validation' where "
                        "OSSCAR's local search moved away from its greedy start, the one of the two with the better "
                        "score on --validation-windows held-out windows (next-token loss; encoders: embedding "
                        "fidelity); 'loss' the one with the lowest estimated change of the calibration loss (causal "
                        "LMs)")
    p.add_argument("--validation-windows", type=non_negative_int, default=None,
                   help="held-out windows (encoders: paragraphs) of --select validation, from the calibration half, "
                        "sharing no token with the calibration ones (default 40)")
    p.add_argument("--validate", default=None, metavar="STRUCTURES",
                   help="comma-separated structures --select validation checks (default: the heads), e.g. "
                        "heads,neurons")
    p.add_argument("--calib", default="pydoc", help="calibration text: pydoc, wikitext2, c4, ptb or a .txt/.jsonl file")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--eval-windows", type=int, default=40, help="evaluation windows (causal LMs)")
    p.add_argument("--dense-activations", action="store_true", help="prune every layer on the dense model's activations")
    p.add_argument("--targets", choices=TARGETS, default=DEFAULT_TARGETS,
                   help="what each layer's refit reproduces: 'layer' its own dense output (the published mode), "
                        "'dense' the dense model's residual stream, correcting upstream error (default for "
                        "sequential pruning of a transformer other than Gemma2/3 and OLMo2)")
    p.add_argument("--target-damping", type=target_damping, default=TARGET_DAMPING,
                   help="ridge of the dense-target correction, fraction of the mean diagonal, or 'validated' "
                        "(default: ridge and shrinkage chosen per layer by two-fold validation)")
    p.add_argument("--calib-seed", type=non_negative_int, default=None,
                   help="draw the calibration windows at random positions of the calibration half with this seed "
                        "(encoders: paragraphs drawn at random; default: consecutive ones from its start)")
    p.add_argument("--damping", type=float, default=DAMPING,
                   help=f"ridge added to each Gram matrix, as a fraction of its mean diagonal (default {DAMPING})")
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default: cpu); a model larger than the GPU's free memory is pruned and "
                        "evaluated with one block on the GPU at a time, and its latency is not measured")
    p.add_argument("--out", type=Path, default=None, help="write the pruned model, report.json and report.md here")
    p.add_argument("--sweep", default=None, help="comma-separated sparsities: a quality-versus-sparsity table")
    p.add_argument("--no-speed", action="store_true", help="skip the latency measurement")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    def run(args: argparse.Namespace) -> int:
        from .prune_cli import prune_command

        return prune_command(args)

    return run


# ------------------------------------------------------------ export-mps
@command("export-mps", "write an instance as an MIQP in MPS format (read by HiGHS and SCIP)")
def _export_mps_args(p: argparse.ArgumentParser):
    p.add_argument("file", type=Path, help="instance file (.npz)")
    p.add_argument("out", type=Path, help="output .mps file")
    p.add_argument("--formulation", choices=("bigm", "perspective"), default="bigm",
                   help="bigm (SCIP solves it; HiGHS reads it, but solves QPs only, not MIQPs) or perspective cones (SCIP, Gurobi, CPLEX)")
    p.add_argument("--objective", choices=("f", "err"), default="f", help="minimize f(S) or err(S)")
    p.add_argument("--keep", type=int, default=None)

    def run(args: argparse.Namespace) -> int:
        from .io import load_instance
        from .mps import write_mps

        inst = load_instance(args.file)
        if args.keep is not None:
            inst = inst.with_keep(args.keep)
        model = write_mps(inst, args.out, formulation=args.formulation, objective=args.objective)
        print(f"wrote {args.out}: {model}")
        return 0

    return run


# ------------------------------------------------------------ bench
@command("bench", "run solvers on instances, each pair in its own process; rows go to OUT/runs.jsonl")
def _bench_args(p: argparse.ArgumentParser):
    p.add_argument("--instances", nargs="+", required=True, metavar="SELECTION",
                   help="catalog tiers (T0,T1), ids or patterns, or instance files, globs or folders")
    p.add_argument("--solvers", required=True, help="comma-separated solver names (see `osscar-opt solvers`)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per solve (default 60)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes run at once (default 1)")
    p.add_argument("--out", type=Path, required=True, help="results folder; a rerun resumes it")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="run on this Dask scheduler (tcp://host:8786)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (solvers without cuda run on cpu)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="SOLVER.NAME=VALUE",
                   help="a solver parameter, repeatable")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds past the time limit before a worker is killed (default 10)")
    p.add_argument("--memory-limit", type=float, default=None, metavar="GB", help="kill a worker above this RSS")
    p.add_argument("--threads", type=int, default=None, help="threads per worker (default: cores / jobs)")
    p.add_argument("--catalog", type=Path, default=None, help="catalog file (default: instances/catalog.json)")
    p.add_argument("--build-dir", type=Path, default=None, help="folder of rebuilt instances (default: instances/build)")
    p.add_argument("--update-catalog", action="store_true",
                   help="record evaluator-confirmed improvements in the catalog's best-known values")
    p.add_argument("--quiet", action="store_true", help="no progress lines")

    def run(args: argparse.Namespace) -> int:
        from .harness import bench

        bench(args.instances, args.solvers, args.out, time_limit=args.time_limit, jobs=args.jobs,
              scheduler=args.scheduler, device=args.device, params=args.param, grace=args.grace,
              memory_limit_gb=args.memory_limit, threads=args.threads, catalog=args.catalog,
              build_dir=args.build_dir, update_catalog=args.update_catalog, progress=not args.quiet)
        return 0

    return run


# ------------------------------------------------------------ report
@command("report", "tables and plots (report.md, PNG) for a bench results folder")
def _report_args(p: argparse.ArgumentParser):
    p.add_argument("out", type=Path, help="a folder written by `osscar-opt bench`")

    def run(args: argparse.Namespace) -> int:
        from .report import write_report

        path = write_report(args.out)
        print(f"wrote {path} and its plots")
        return 0

    return run


# ------------------------------------------------------------ benchmarks
@command("bench-speed", "OSSCAR time and memory on SmolLM2 and synthetic 1k..28k-wide layers (results/speed.md)")
def _bench_speed_args(p: argparse.ArgumentParser):
    p.add_argument("--device", action="append", default=None, help="cpu and/or cuda (default: both when present)")
    p.add_argument("--sizes", default=None, help="comma-separated synthetic widths d (default: by device)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="OSSCAR's working precision")
    p.add_argument("--local-search-max-d", type=int, default=None,
                   help="skip the local search above this width (default: always run it)")
    p.add_argument("--no-layer", action="store_true", help="only the synthetic widths (no SmolLM2 layer)")
    p.add_argument("--low-memory", action="store_true", help="OSSCAR's low_memory mode (H off the device during the greedy)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per timed solve (the local search stops there)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")

    def run(args: argparse.Namespace) -> int:
        from .benchmarks import speed

        sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else None
        speed.run(devices=args.device, sizes=sizes, repeats=args.repeats, out=args.out, dtype=args.dtype,
                  local_search_max_d=args.local_search_max_d, layer=not args.no_layer,
                  low_memory=args.low_memory, time_limit=args.time_limit)
        return 0

    return run


@command("bench-prune", "whole-model sweeps per solver over sparsity (results/prune_<model>.md/.png)")
def _bench_prune_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--solvers", default=None, help="comma-separated (default: osscar and every heuristic); one "
                   "solver per structure is written heads=obs-greedy+neurons=osscar, and one layer's own "
                   "default=osscar+heads[0]=obs-greedy")
    p.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5,0.6")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")
    p.add_argument("--damping", "--dampings", dest="damping", default=str(DAMPING),
                   help=f"ridge of the Gram matrices, fraction of the mean diagonal; comma-separated for several "
                        f"(rows other than {DAMPING} are labelled)")
    p.add_argument("--no-speed", action="store_true", help="skip the latency comparison at 50%%")
    p.add_argument("--validation-windows", type=non_negative_int, default=0,
                   help="also measure quality on this many calibration-half windows (causal LMs: perplexity) or "
                        "paragraphs (encoders: fidelity) apart from the calibration ones (what --select validation "
                        "scores); the report then picks the damping by them")
    p.add_argument("--calib-seeds", default=None,
                   help="comma-separated seeds: repeat every run with calibration windows drawn at random positions "
                        "(one draw per seed; the report adds mean and spread)")
    p.add_argument("--structures", default=None,
                   help="comma-separated structures instead of the default (e.g. query-heads,neurons: GQA query "
                        "heads kept freely, KV heads duplicated where needed)")
    p.add_argument("--targets", choices=TARGETS, default=None,
                   help="refit targets of apply(): 'dense' (default; rows unlabelled) or 'layer' (the published "
                        "mode; rows labelled 'layer targets')")
    p.add_argument("--target-damping", type=target_damping, default=TARGET_DAMPING,
                   help="ridge of the dense-target correction, or 'validated' (default; fixed ridges are labelled)")
    p.add_argument("--select", choices=SELECT, default="err",
                   help="apply()'s choice of attention heads: 'err' (default), 'validation' (on the "
                        "--validation-windows; rows labelled 'heads validated') or 'loss' (rows labelled 'heads by "
                        "loss')")
    p.add_argument("--validate", default=None, metavar="STRUCTURES",
                   help="comma-separated structures --select validation checks (default: the heads)")

    def run(args: argparse.Namespace) -> int:
        from .benchmarks import prune
        from .io import writable_folder

        sparsities = sparsity_list(args.sparsities, "--sparsities")
        if args.out is not None:
            writable_folder(args.out)
        solvers = [s for s in args.solvers.split(",") if s.strip()] if args.solvers else prune.DEFAULT_SOLVERS
        from .apply import check_solver

        for solver in solvers:  # names, per-structure solvers and --device, before the model is loaded
            check_solver(solver, args.device, {})
        from .prune_cli import _validated, check_select

        check_select(args.model, args.select)
        if args.validate is not None and args.select != "validation":
            raise OsscarError("--validate belongs to --select validation: add --select validation, or leave it out")
        try:
            seeds = [int(x) for x in args.calib_seeds.split(",")] if args.calib_seeds else [None]
        except ValueError:
            raise OsscarError(f"--calib-seeds takes comma-separated integers like 0,1,2, got {args.calib_seeds!r}")
        try:
            dampings = [float(x) for x in str(args.damping).split(",")]
        except ValueError:
            raise OsscarError(f"--damping takes numbers like 0.01 or 0.002,0.01, got {args.damping!r}")
        from .instance import check_damping

        for value in dampings:
            check_damping(value)
        check_window_counts(args)
        prune.run(args.model, solvers, sparsities, args.nsamples,
                  args.seq_len, args.eval_windows, args.device, args.out, damping=dampings, calib_seeds=seeds,
                  validation_windows=args.validation_windows, speed_at=None if args.no_speed else 0.5,
                  structures=args.structures.split(",") if args.structures else None, targets=args.targets,
                  target_damping=args.target_damping, select=args.select,
                  validate=_validated(args))
        return 0

    return run


@command("bench-supports", "every support of one small site: layer err against the model's perplexity "
                           "(results/supports_*.md)")
def _bench_supports_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=non_negative_int, default=0)
    p.add_argument("--structure", default="heads")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--validation-windows", type=non_negative_int, default=40,
                   help="calibration-half windows after the calibration ones (0: skip)")
    p.add_argument("--loss-windows", type=int, default=8, help="calibration windows for the calibration loss")
    p.add_argument("--damping", type=float, default=DAMPING)
    p.add_argument("--solvers", default="osscar,obs-greedy", help="comma-separated: their picks are marked")
    p.add_argument("--max-supports", type=int, default=64, help="refuse sites with more feasible supports")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")

    def run(args: argparse.Namespace) -> int:
        from .benchmarks import supports
        from .instance import check_damping

        if not 0.0 < args.sparsity < 1.0:
            raise OsscarError(f"--sparsity must lie in (0, 1), got {args.sparsity}")
        check_damping(args.damping)
        check_window_counts(args)
        if args.loss_windows < 1:
            raise OsscarError(f"--loss-windows must be at least 1, got {args.loss_windows}")
        supports.run(args.model, args.layer, args.structure, args.sparsity, args.nsamples, args.seq_len,
                     args.eval_windows, args.validation_windows, args.loss_windows, args.damping,
                     [s for s in args.solvers.split(",") if s], args.max_supports, args.out)
        return 0

    return run


@command("bench-extract", "time and peak memory of extracting every SmolLM2 layer (results/extract.md)")
def _bench_extract_args(p: argparse.ArgumentParser):
    p.add_argument("--windows", default="16,64", help="comma-separated numbers of calibration windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device", action="append", default=None, help="cpu and/or cuda (default: both when present)")
    p.add_argument("--out", type=Path, default=None)

    def run(args: argparse.Namespace) -> int:
        from .benchmarks import extraction

        try:
            windows = [int(x) for x in args.windows.split(",")]
        except ValueError:
            windows = [0]
        if min(windows) < 1:
            raise OsscarError(f"--windows takes comma-separated positive integers like 16,64, got {args.windows!r}")
        extraction.run(windows, args.seq_len, args.device, out=args.out)
        return 0

    return run


@command("bench-reference", "OSSCAR against the published code on SmolLM2 layers 0/10/20 (results/reference.md)")
def _bench_reference_args(p: argparse.ArgumentParser):
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")

    def run(args: argparse.Namespace) -> int:
        from .benchmarks import reference

        rows = reference.run(device=args.device, repeats=args.repeats, out=args.out)
        return 0 if all(r["no_worse"] for r in rows) else 1

    return run


@command("bench-shaped", "timing and GPU memory on a model's shapes with random weights (make, offload, latency)")
def _bench_shaped_args(p: argparse.ArgumentParser):
    from .benchmarks import shaped

    shaped.add_arguments(p)
    return shaped.run


# ------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="osscar-opt",
        description="One-shot structured pruning as mixed-integer optimization: solve, compare, apply.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (build, help) in _COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(_run=build(p))
    return parser


def _check_devices(device: Any) -> None:
    """Every --device names cpu or an available cuda device: checked before any command starts work."""
    from .registry import device_problem

    for d in device if isinstance(device, list) else [] if device is None else [device]:
        problem = device_problem(d, use_cpu="--device cpu")
        if problem:
            raise CliError(f"--device {d}: {problem}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_devices(getattr(args, "device", None))
        return int(args._run(args) or 0)
    except OsscarError as exc:
        print(f"osscar-opt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("osscar-opt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # the file system refused: a missing or read-only folder, a full disk
        where = f": {exc.filename}" if exc.filename else ""
        print(f"osscar-opt: error: {exc.strerror or exc}{where} (check the path, its permissions and the free space)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
