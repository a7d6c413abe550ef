"""Helpers shared by the baseline heuristics.

Notation (DESIGN.md section 1): H (d x d) SPD, W_hat (d x m), G = H W_hat,
f(S) = -0.5 tr(G_S' H_SS^-1 G_S), f(all) = -0.5 tr(W_hat' H W_hat).
"""

from __future__ import annotations

import numpy as np
import torch

from osscar_opt.instance import Instance
from osscar_opt.osscar import DTYPES, prepare_tensors, take_lowest  # noqa: F401


def check_dtype(dtype: str) -> None:
    """Raise ValueError (turned into a SolverError by make_params) for an unknown dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def select_top(instance: Instance, scores: np.ndarray) -> np.ndarray:
    """Sorted ids of the `keep` groups of largest score (ties: lower id first).

    With a partition, exactly budget[j] groups of every part j are kept: the
    budget[j] largest scores of that part.
    """
    scores = np.asarray(scores, dtype=np.float64)
    part = instance.partition
    if part is None:
        pos = take_lowest(-scores, None, None, instance.keep)
    else:
        # at most budget[j] per part, `keep` = sum(budget) in all: exactly budget[j] per part
        pos = take_lowest(-scores, part.parts, part.budget, instance.keep)
    return np.sort(pos)


def group_sq_norms(instance: Instance, rows_sq: np.ndarray) -> np.ndarray:
    """Sum of a per-row quantity over the rows of every group, shape (p,)."""
    return np.bincount(instance.groups, weights=rows_sq, minlength=instance.n_groups)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
