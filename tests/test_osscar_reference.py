"""The fast OSSCAR (lazy low-rank greedy, rank-one swap updates, batched
scores) against the plain reference implementation that recomputes
everything with numpy: both must choose the same support."""

import numpy as np

import osscar_opt as oo
from osscar_opt.osscar import OsscarParams
from osscar_opt.osscar_reference import reference_greedy, reference_osscar

from conftest import random_instance


def test_fast_path_matches_the_reference(rng):
    for trial in range(24):
        p = int(rng.integers(6, 36))
        b = int(rng.choice([1, 1, 2, 3]))
        keep = int(rng.integers(1, p))
        partition = None
        if trial % 4 == 3:
            p = 12
            partition = np.repeat(np.arange(3), 4)
            keep = 3 * int(rng.integers(1, 4))
        inst = random_instance(rng, p=p, group_size=b, keep=keep, m=int(rng.integers(2, 12)), n=400,
                               partition=partition)
        params = OsscarParams(swap_size=int(rng.choice([1, 2, 4])), stage_fraction=float(rng.choice([0.25, 0.5])))
        fast_greedy = oo.solve(inst, "osscar", device="cpu", local_search=False,
                               swap_size=params.swap_size, stage_fraction=params.stage_fraction)
        assert fast_greedy.keep.tolist() == reference_greedy(inst, params).tolist(), trial
        fast = oo.solve(inst, "osscar", device="cpu", swap_size=params.swap_size,
                        stage_fraction=params.stage_fraction)
        assert fast.keep.tolist() == reference_osscar(inst, params).tolist(), trial


def test_fast_path_matches_the_reference_on_many_single_swaps(rng):
    """A larger neuron-style instance where the rank-one updates run many times."""
    inst = random_instance(rng, p=90, group_size=1, keep=45, m=20, n=600)
    params = OsscarParams(swap_size=1, refresh_every=7)
    fast = oo.solve(inst, "osscar", device="cpu", swap_size=1, refresh_every=7)
    assert fast.info["single_swaps"] >= 2
    assert fast.keep.tolist() == reference_osscar(inst, params).tolist()
