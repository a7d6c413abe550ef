"""Helpers shared by the baseline heuristics.

Notation (DESIGN.md section 1): H (d x d) SPD, W_hat (d x m), G = H W_hat,
f(S) = -0.5 tr(G_S' H_SS^-1 G_S), f(all) = -0.5 tr(W_hat' H W_hat).
"""

from __future__ import annotations

import numpy as np
import torch

from osscar_opt.instance import Instance
from osscar_opt.osscar import _DTYPES, Osscar, OsscarParams, _Prepared, _take_lowest


def check_dtype(dtype: str) -> None:
    """Raise ValueError (turned into a SolverError by make_params) for an unknown dtype."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")


def prepare_tensors(instance: Instance, device: str, dtype: str) -> _Prepared:
    """H and W_hat on `device` in `dtype`, rows permuted so groups are contiguous.

    The same layout OSSCAR uses (`osscar_opt.osscar._Prepared`: group g owns
    rows offsets[g] .. offsets[g] + sizes[g] - 1, groups in id order).
    """
    return Osscar().prepare(instance, OsscarParams(dtype=dtype), device)


def select_top(instance: Instance, scores: np.ndarray) -> np.ndarray:
    """Sorted ids of the `keep` groups of largest score (ties: lower id first).

    With a partition, exactly budget[j] groups of every part j are kept: the
    budget[j] largest scores of that part.
    """
    scores = np.asarray(scores, dtype=np.float64)
    part = instance.partition
    if part is None:
        pos = _take_lowest(-scores, None, None, instance.keep)
    else:
        # at most budget[j] per part, `keep` = sum(budget) in all: exactly budget[j] per part
        pos = _take_lowest(-scores, part.parts, part.budget, instance.keep)
    return np.sort(pos)


def group_sq_norms(instance: Instance, rows_sq: np.ndarray) -> np.ndarray:
    """Sum of a per-row quantity over the rows of every group, shape (p,)."""
    return np.bincount(instance.groups, weights=rows_sq, minlength=instance.n_groups)


def no_refit_objective(instance: Instance, keep: np.ndarray) -> float:
    """q(W_hat masked to the support), in fp64.

    With q(W) = 0.5 tr(W'HW) - tr(G'W) = 0.5 tr((W - W_hat)' H (W - W_hat)) + f(all),
    zeroing the pruned rows P of W_hat (D = masked - W_hat = -W_hat on P) gives
    q = 0.5 tr(W_hat_P' H_PP W_hat_P) + f(all).
    """
    pruned = np.ones(instance.n_groups, dtype=bool)
    pruned[np.asarray(keep, dtype=np.int64)] = False
    rows = instance.rows_of(np.flatnonzero(pruned))
    if rows.size == 0:
        return instance.full_objective
    Wp = instance.W[rows]
    quad = 0.5 * float(np.einsum("ij,ij->", Wp, instance.H[np.ix_(rows, rows)] @ Wp))
    return quad + instance.full_objective


def no_refit_info(instance: Instance, keep: np.ndarray) -> dict:
    """`info` entries of a heuristic that keeps W_hat on its support without refitting.

    err_no_refit = 0.5 tr(D'HD) / (-f(all)), D = W_hat masked - W_hat; the
    Solution's own `err` and `weights` are always those of the optimal refit.
    """
    objective = no_refit_objective(instance, keep)
    full = instance.full_objective
    return {
        "refit": False,
        "objective_no_refit": objective,
        "err_no_refit": (objective - full) / (-full),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
