"""The complement form's lifted semidefinite relaxation, solved by cvxpy: a
reference value for `shor-bnb`'s bounds, and a measure of what the RLT
inequalities would add.

The removal cost 0.5 tr(L_R' (K_RR)^-1 L_R) (see exact/shor.py) is relaxed to

    min tr(X)  s.t.  [[K o P_rows, D_a L], [L' D_a, 2X]] PSD,
                     [[1, a'], [a, P]] PSD, diag(P) = a, 0 <= a <= 1,
                     sum of a over part j = removal budget of j,

with P_rows = E P E' (E: rows x groups). `rlt` adds, for every pair of groups,
"u": P_gh <= a_g, "l": P_gh >= a_g + a_h - 1, "n": P_gh >= 0, and "c": the
products of the budgets with a (P 1_j = r_j a on each part j). The value is
a lower bound on the removal cost up to the solver's accuracy only: it is a
yardstick, not a certificate (shor-bnb's bounds are).

    python -m exact.lifted_sdp INSTANCE.npz [--rlt ul]

prints the bound on err. Dense interior-point algebra: fine up to about 60
groups, minutes there, memory-bound beyond 100 rows.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from osscar_opt.instance import Instance

from .shor import ComplementForm


def lifted_sdp_bound(instance: Instance, rlt: str = "", solver: str = "CLARABEL") -> tuple[float, str]:
    """(lower bound on err, solver status) of the lifted relaxation with the RLT families in `rlt`."""
    try:
        import cvxpy as cp
    except ImportError as exc:  # pragma: no cover - cvxpy is a core dependency
        raise ImportError("the lifted relaxation needs cvxpy: pip install cvxpy") from exc
    unknown = set(rlt) - set("ulnc")
    if unknown:
        raise ValueError(f"unknown RLT families {''.join(sorted(unknown))!r}: use letters of 'ulnc'")
    form = ComplementForm(instance)
    n = form.p
    U, s, _ = np.linalg.svd(form.L, full_matrices=False)
    keep = s > 1e-9 * s[0]
    L = U[:, keep] * s[keep]
    E = np.zeros((form.gid.size, n))
    E[np.arange(form.gid.size), form.gid] = 1.0
    Y = cp.Variable((n + 1, n + 1), symmetric=True)
    a, P = Y[0, 1:], Y[1:, 1:]
    X = cp.Variable((L.shape[1], L.shape[1]), symmetric=True)
    Da_L = cp.multiply(cp.reshape(E @ a, (E.shape[0], 1), order="F") @ np.ones((1, L.shape[1])), L)
    lifted = cp.bmat([[cp.multiply(form.K, E @ P @ E.T), Da_L], [Da_L.T, 2 * X]])
    part = np.zeros((n, form.remove.size))
    part[np.arange(n), form.parts] = 1.0
    cons = [Y >> 0, lifted >> 0, Y[0, 0] == 1, cp.diag(P) == a, a >= 0, a <= 1, part.T @ a == form.remove]
    col = cp.reshape(a, (n, 1), order="F") @ np.ones((1, n))  # col[g, h] = a_g
    if "u" in rlt:
        cons.append(P <= col)
    if "l" in rlt:
        cons.append(P >= col + col.T - 1)
    if "n" in rlt:
        cons.append(P >= 0)
    if "c" in rlt:
        budget = cp.reshape(a, (n, 1), order="F") @ form.remove[None, :].astype(np.float64)  # a_g r_j
        cons.append(cp.multiply(P @ part, part) == cp.multiply(budget, part))
    problem = cp.Problem(cp.Minimize(cp.trace(X)), cons)
    problem.solve(solver=solver)
    if problem.value is None:
        raise RuntimeError(f"the semidefinite solver ended with status {problem.status}")
    return float(problem.value) / -instance.full_objective, str(problem.status)


def main(argv=None) -> None:
    from osscar_opt.io import load_instance

    ap = argparse.ArgumentParser(prog="python -m exact.lifted_sdp", description=__doc__.split("\n\n")[0])
    ap.add_argument("instance", help="an instance file (.npz)")
    ap.add_argument("--rlt", default="", help="RLT families to add: letters of 'ulnc' (default none)")
    ap.add_argument("--solver", default="CLARABEL", help="cvxpy solver (default CLARABEL)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    bound, status = lifted_sdp_bound(load_instance(args.instance), args.rlt, args.solver)
    print(f"lifted relaxation{' + RLT ' + args.rlt if args.rlt else ''}: err >= {bound:.6g} "
          f"({status}, {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
