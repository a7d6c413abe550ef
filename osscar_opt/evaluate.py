"""The one fp64 evaluator: every objective and err reported goes through it.

For a support S (a set of groups) it computes in float64, on the CPU (torch's
LAPACK, one thread pool with the solvers) or, when asked, on a CUDA device
(only the support's rows of H travel), with a Cholesky factor of H_SS,

    W_S  = H_SS^-1 G_S                       (optimal weights on S, zero elsewhere)
    f(S) = -0.5 tr(G_S' H_SS^-1 G_S)
    err(S) = (f(S) - f(all)) / (-f(all))     (0 = lossless, 1 = everything pruned)

independently of any solver's own bookkeeping (DESIGN.md section 1).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import InstanceError
from .instance import Instance


@dataclass(frozen=True)
class Evaluation:
    keep: np.ndarray  # sorted group ids of the support
    objective: float  # f(S)
    err: float  # relative reconstruction error
    weights: np.ndarray | None  # (d, m) optimal weights, zero outside S
    feasible: bool  # exactly `keep` groups and every partition budget met


def support_array(instance: Instance, keep_groups: Sequence[int] | np.ndarray) -> np.ndarray:
    """Validate a support (group ids, or a boolean mask over the groups) and return it as a
    sorted int64 array of group ids."""
    S = np.asarray(keep_groups)
    if S.ndim != 1:
        raise InstanceError(f"a support is a 1-D list of group ids, got shape {S.shape}")
    if S.dtype == bool:  # a keep mask over the groups
        if S.size != instance.n_groups:
            raise InstanceError(f"a boolean support is a mask over the {instance.n_groups} groups, got length {S.size}: "
                                "give one entry per group or a list of group ids")
        S = np.flatnonzero(S)
    if S.size and not np.issubdtype(S.dtype, np.integer):
        if not np.all(np.isfinite(S)) or not np.all(S == np.round(S)):
            raise InstanceError("a support must contain integer group ids")
    S = np.sort(S.astype(np.int64))
    if S.size and (S[0] < 0 or S[-1] >= instance.n_groups):
        raise InstanceError(f"support group ids must lie in [0, {instance.n_groups - 1}]")
    if S.size > 1 and np.any(S[1:] == S[:-1]):
        raise InstanceError("support contains duplicate group ids")
    return S


def is_feasible(instance: Instance, S: np.ndarray) -> bool:
    if S.size != instance.keep:
        return False
    part = instance.partition
    if part is None:
        return True
    counts = np.bincount(part.parts[S], minlength=part.n_parts)
    return bool(np.array_equal(counts, part.budget))


def n_supports(instance: Instance) -> int:
    """The number of feasible supports (partition budgets met)."""
    part = instance.partition
    if part is None:
        return math.comb(instance.n_groups, instance.keep)
    sizes = part.part_sizes()
    return int(np.prod([math.comb(int(s), int(b)) for s, b in zip(sizes, part.budget)]))


def supports(instance: Instance):
    """Iterate over every feasible support (sorted tuples of group ids)."""
    part = instance.partition
    if part is None:
        yield from itertools.combinations(range(instance.n_groups), instance.keep)
        return
    members = [np.flatnonzero(part.parts == j).tolist() for j in range(part.n_parts)]
    choices = [itertools.combinations(mem, int(b)) for mem, b in zip(members, part.budget)]
    for combo in itertools.product(*[list(c) for c in choices]):
        yield tuple(sorted(itertools.chain.from_iterable(combo)))


def evaluate(instance: Instance, keep_groups: Sequence[int] | np.ndarray, weights: bool = True,
             device: str | torch.device | None = None) -> Evaluation:
    """Objective f(S), err(S) and the optimal weights on the support, in fp64.

    `device` (default CPU) is where the arithmetic runs; a CUDA device is worth
    it for layers of several thousand rows and gives the same fp64 values up
    to round-off."""
    S = support_array(instance, keep_groups)
    feasible = is_feasible(instance, S)
    if S.size == 0:
        W = np.zeros_like(instance.W) if weights else None
        return Evaluation(S, 0.0, 1.0, W, feasible)
    rows = instance.rows_of(S)
    dev = torch.device(device or "cpu")
    if dev.type == "cpu":
        H_S = torch.from_numpy(instance.H)[torch.from_numpy(rows)]
    else:
        H_S = torch.from_numpy(np.ascontiguousarray(instance.H[rows])).to(dev)
    H_SS = H_S[:, torch.from_numpy(rows).to(dev)]
    G_S = H_S @ torch.from_numpy(instance.W).to(dev)
    del H_S
    L, info = torch.linalg.cholesky_ex(H_SS)
    if int(info) != 0:
        raise InstanceError(
            "H restricted to the support is not positive definite: the instance H is not SPD; rebuild it with damping"
        )
    Y = torch.linalg.solve_triangular(L, G_S, upper=False)
    objective = -0.5 * float((Y * Y).sum())
    err = (objective - instance.full_objective) / (-instance.full_objective)
    W = None
    if weights:
        W = np.zeros_like(instance.W)
        W[rows] = torch.linalg.solve_triangular(L.T, Y, upper=True).cpu().numpy()
    return Evaluation(S, objective, float(err), W, feasible)


def err_of_objective(instance: Instance, objective: float) -> float:
    """The err value that corresponds to an objective value f (or a bound on it)."""
    return (objective - instance.full_objective) / (-instance.full_objective)


def evaluate_masked(instance: Instance, keep_groups: Sequence[int] | np.ndarray) -> tuple[float, float]:
    """(objective, err) of W_hat with the pruned groups' rows zeroed, no refit.

    q(W) = 0.5 tr(W'HW) - tr(G'W) = 0.5 tr((W - W_hat)' H (W - W_hat)) + f(all);
    zeroing the pruned rows P gives q = 0.5 tr(W_hat_P' H_PP W_hat_P) + f(all).
    """
    S = support_array(instance, keep_groups)
    pruned = np.ones(instance.n_groups, dtype=bool)
    pruned[S] = False
    rows = instance.rows_of(np.flatnonzero(pruned))
    quad = 0.0
    if rows.size:
        Wp = instance.W[rows]
        quad = 0.5 * float(np.einsum("ij,ij->", Wp, instance.H[np.ix_(rows, rows)] @ Wp))
    objective = quad + instance.full_objective
    return objective, err_of_objective(instance, objective)


def masked_weights(instance: Instance, keep_groups: Sequence[int] | np.ndarray) -> np.ndarray:
    """W_hat with the pruned groups' rows zeroed: what a method that does not
    refit deploys on the support."""
    rows = instance.rows_of(support_array(instance, keep_groups))
    weights = np.zeros_like(instance.W)
    weights[rows] = instance.W[rows]
    return weights


def deployed(instance: Instance, keep_groups: Sequence[int] | np.ndarray, refits: bool = True,
             device: str | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(support, weights, err) as a method deploys the support: its refit
    weights and err(S), or for a method that does not refit, `masked_weights`
    and their err (`evaluate_masked`)."""
    if refits:
        ev = evaluate(instance, keep_groups, device=device)
        return ev.keep, ev.weights, ev.err
    S = support_array(instance, keep_groups)
    return S, masked_weights(instance, S), evaluate_masked(instance, S)[1]

