"""The `osscar-opt` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import OsscarError

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
        from .io import load_instance
        from .registry import coerce_param, get_solver, solve

        inst = load_instance(args.file)
        if args.keep is not None:
            inst = inst.with_keep(args.keep)
        elif args.sparsity is not None:
            inst = inst.with_keep(inst.keep_for_sparsity(args.sparsity))
        cls = get_solver(args.solver)
        params = {}
        for item in args.param:
            if "=" not in item:
                raise OsscarError(f"solver parameters are NAME=VALUE, got {item!r}")
            key, value = item.split("=", 1)
            params[key.strip()] = coerce_param(cls, key.strip(), value.strip())
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


def _write_json_atomic(path: Path, obj: Any) -> None:
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, default=_json_default)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except OsscarError as exc:
        print(f"osscar-opt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("osscar-opt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
