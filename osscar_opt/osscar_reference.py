"""A plain reference implementation of OSSCAR (numpy, no updates, no tricks).

It recomputes every quantity from scratch with `numpy.linalg` at every step
and follows exactly the decisions of `osscar_opt.osscar` (same stage sizes,
same tie-breaking, same acceptance tests). It is slow and meant for reading
and for checking the fast path: both must choose the same support.
"""

from __future__ import annotations

import math

import numpy as np

from .instance import Instance
from .osscar import OsscarParams, _pair_up, _stage_size, _take_lowest, initial_swap_size


def _objective(inst: Instance, G: np.ndarray, S) -> float:
    rows = inst.rows_of(np.sort(np.asarray(S)))
    if rows.size == 0:
        return 0.0
    return -0.5 * float(np.sum(G[rows] * np.linalg.solve(inst.H[np.ix_(rows, rows)], G[rows])))


def _removal_costs(inst: Instance, G: np.ndarray, S: np.ndarray) -> np.ndarray:
    """0.5 tr(W_g' [(H_SS^-1)_gg]^-1 W_g) for every g in S (sorted)."""
    rows = inst.rows_of(S)
    Hinv = np.linalg.inv(inst.H[np.ix_(rows, rows)])
    W = Hinv @ G[rows]
    pos = {r: i for i, r in enumerate(rows)}
    out = []
    for g in S:
        idx = [pos[r] for r in inst.group_rows[g]]
        Wg = W[idx]
        out.append(0.5 * np.sum(Wg * np.linalg.solve(Hinv[np.ix_(idx, idx)], Wg)))
    return np.array(out)


def _add_gains(inst: Instance, G: np.ndarray, S: np.ndarray, N: np.ndarray) -> np.ndarray:
    """0.5 tr(r_h' Sigma_h^-1 r_h) for every h in N."""
    rows = inst.rows_of(S)
    Hinv = np.linalg.inv(inst.H[np.ix_(rows, rows)])
    W = Hinv @ G[rows]
    out = []
    for h in N:
        hr = inst.group_rows[h]
        r = G[hr] - inst.H[np.ix_(hr, rows)] @ W
        sigma = inst.H[np.ix_(hr, hr)] - inst.H[np.ix_(hr, rows)] @ Hinv @ inst.H[np.ix_(rows, hr)]
        out.append(0.5 * np.sum(r * np.linalg.solve(sigma, r)))
    return np.array(out)


def reference_greedy(inst: Instance, params: OsscarParams) -> np.ndarray:
    G = inst.H @ inst.W
    active = np.arange(inst.n_groups)
    if inst.keep in (0, inst.n_groups):
        return active[: inst.keep] if inst.keep == 0 else active
    caps = None
    if inst.partition is not None:
        caps = inst.partition.part_sizes() - inst.partition.budget
    remaining = inst.n_groups - inst.keep
    while remaining > 0:
        costs = _removal_costs(inst, G, active)
        parts = None if caps is None else inst.partition.parts[active]
        pos = _take_lowest(costs, parts, caps, _stage_size(params, remaining))
        if caps is not None:
            np.subtract.at(caps, parts[pos], 1)
        active = np.delete(active, pos)
        remaining -= pos.size
    return active


def reference_osscar(inst: Instance, params: OsscarParams | None = None) -> np.ndarray:
    """Greedy, then the multi-swap and exact single-swap local search."""
    params = params or OsscarParams()
    S = reference_greedy(inst, params)
    p, keep = inst.n_groups, inst.keep
    if not params.local_search or keep in (0, p):
        return S
    G = inst.H @ inst.W
    parts = None if inst.partition is None else inst.partition.parts
    tol = 1e-12 * abs(inst.full_objective)
    f = _objective(inst, G, S)
    t = initial_swap_size(params, p, keep, bool(np.all(inst.group_sizes == 1)))
    steps = 0
    while t > 1 and steps < params.max_iter:
        steps += 1
        N = np.setdiff1d(np.arange(p), S)
        out_order = np.argsort(_removal_costs(inst, G, S), kind="stable")
        in_order = np.argsort(-_add_gains(inst, G, S, N), kind="stable")
        outs, ins = _pair_up(out_order, in_order, S, N, parts, t)
        if outs.size == 0:
            break
        trial = np.union1d(np.setdiff1d(S, outs), ins)
        f_trial = _objective(inst, G, trial)
        if f_trial < f - tol:
            S, f = trial, f_trial
        else:
            t //= 2
    single_rows = bool(np.all(inst.group_sizes == 1))
    while steps < params.max_iter:
        steps += 1
        N = np.setdiff1d(np.arange(p), S)
        best, best_S = f - tol, None
        pairs = []  # (delta, g, h)
        for g_pos, g in enumerate(S):
            for h in N:
                if parts is not None and parts[g] != parts[h]:
                    continue
                trial = S.copy()
                trial[g_pos] = h
                val = _objective(inst, G, trial)
                pairs.append((val - f, g, h))
                if val < best:
                    best, best_S = val, np.sort(trial)
        if best_S is not None and single_rows:
            # the best few swaps of the scan on distinct groups, each re-scored
            pairs.sort(key=lambda t: t[0])
            moved = set()
            for _, g, h in pairs[: params.swaps_per_scan]:
                if g in moved or h in moved:
                    continue
                trial = np.where(S == g, h, S)
                val = _objective(inst, G, trial)
                if val < f - tol:
                    S, f = np.sort(trial), val
                    moved.update((g, h))
            continue
        if best_S is None and params.pair_swap_limit and S.size >= 2 and N.size >= 2 \
                and math.comb(S.size, 2) * math.comb(N.size, 2) <= params.pair_swap_limit \
                and np.all(inst.group_sizes == inst.group_sizes[0]):
            for a in range(S.size):
                for b in range(a + 1, S.size):
                    for c in range(N.size):
                        for d in range(c + 1, N.size):
                            if parts is not None and sorted((parts[S[a]], parts[S[b]])) != sorted((parts[N[c]], parts[N[d]])):
                                continue
                            trial = S.copy()
                            trial[a], trial[b] = N[c], N[d]
                            val = _objective(inst, G, trial)
                            if val < best:
                                best, best_S = val, np.sort(trial)
        if best_S is None:
            break
        S, f = best_S, best
    return np.sort(S)
