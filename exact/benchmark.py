"""Rerunnable timing of the exact solvers on crops of real layers (the numbers in the report).

    python -m exact.benchmark --instance /path/smollm2-l10-down.npz --sizes 30,60 \\
        --solvers bnb,highs-oa,scip --time-limit 60

Crops are chosen as in the issue: n groups drawn by
np.random.default_rng(seed).choice(p, n, replace=False), sorted, keep = n // 2.
Each row: solver, crop size, status, err, certified err bound, relative gap,
solve seconds (prepare seconds apart) and the solver's node/iteration count.
The split cache is cleared before every solve so each time includes its split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import osscar_opt as oo

from .perspective import clear_split_cache


def crop(instance: oo.Instance, n: int, seed: int = 0) -> oo.Instance:
    ids = np.sort(np.random.default_rng(seed).choice(instance.n_groups, n, replace=False))
    return instance.crop(ids, keep=n // 2)


def run(instance_path: str, sizes: list[int], solvers: list[str], time_limit: float, seed: int = 0,
        params: dict | None = None) -> list[dict]:
    full = oo.load_instance(instance_path)
    rows = []
    for n in sizes:
        inst = crop(full, n, seed)
        for name in solvers:
            clear_split_cache()
            t0 = time.perf_counter()
            sol = oo.solve(inst, name, device="cpu", time_limit=time_limit, **(params or {}).get(name, {}))
            row = {
                "instance": instance_path.rsplit("/", 1)[-1], "n": n, "keep": inst.keep, "solver": name,
                "status": str(sol.status), "err": sol.err, "err_bound": sol.err_bound, "gap": sol.gap,
                "seconds": round(sol.seconds, 3), "prepare_seconds": round(sol.prepare_seconds, 3),
                "wall_seconds": round(time.perf_counter() - t0, 3),
                "nodes": sol.info.get("nodes", sol.info.get("iterations")),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instance", required=True, help="an instance file (osscar_opt.load_instance)")
    ap.add_argument("--sizes", default="30", help="comma-separated crop sizes (groups)")
    ap.add_argument("--solvers", default="bnb", help="comma-separated solver names")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    run(args.instance, [int(s) for s in args.sizes.split(",")], args.solvers.split(","), args.time_limit, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
