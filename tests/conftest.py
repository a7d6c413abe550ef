"""Shared fixtures: random instances built the way real layers are (correlated
activations, damped Gram) and an independent plain-numpy brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import osscar_opt as oo


def random_activations(rng: np.random.Generator, n: int, d: int, noise: float = 0.3) -> np.ndarray:
    """Correlated activations X = Z A' + noise E with a d/3-dimensional factor."""
    r = max(1, d // 3)
    A = rng.standard_normal((d, r))
    return rng.standard_normal((n, r)) @ A.T + noise * rng.standard_normal((n, d))


def random_instance(rng, p=8, group_size=1, keep=4, m=5, n=200, partition=None, damping=0.01, dead=()):
    d = p * group_size
    X = random_activations(rng, n, d)
    for row in dead:
        X[:, row] = 0.0
    W = rng.standard_normal((d, m))
    return oo.Instance.from_activations(X, W, keep, group_size=group_size, partition=partition, damping=damping)


def plain_objective(inst: oo.Instance, support) -> float:
    """f(S) = -0.5 tr(G_S' H_SS^-1 G_S) with numpy's generic solver."""
    rows = np.concatenate([np.flatnonzero(inst.groups == g) for g in support]) if len(support) else np.zeros(0, int)
    if rows.size == 0:
        return 0.0
    G = inst.H @ inst.W
    Hs = inst.H[np.ix_(rows, rows)]
    return -0.5 * float(np.sum(G[rows] * np.linalg.solve(Hs, G[rows])))


def brute_force(inst: oo.Instance) -> tuple[float, tuple[int, ...]]:
    """The optimum over every feasible support, by plain enumeration."""
    best = (np.inf, ())
    for S in itertools.combinations(range(inst.n_groups), inst.keep):
        if inst.partition is not None:
            counts = np.bincount(inst.partition.parts[list(S)], minlength=inst.partition.n_parts)
            if not np.array_equal(counts, inst.partition.budget):
                continue
        val = plain_objective(inst, S)
        if val < best[0]:
            best = (val, S)
    return best


@pytest.fixture
def rng():
    return np.random.default_rng(20241125)


@pytest.fixture
def small_instance(rng):
    return random_instance(rng, p=10, group_size=2, keep=4, m=6)
