import numpy as np
import pytest
import torch

import osscar_opt as oo

from conftest import brute_force, random_instance


def _no_single_swap_improves(inst, keep, tol=1e-10):
    base = oo.evaluate(inst, keep).objective
    out = np.setdiff1d(np.arange(inst.n_groups), keep)
    for i, g in enumerate(keep):
        for h in out:
            if inst.partition is not None and inst.partition.parts[g] != inst.partition.parts[h]:
                continue
            trial = keep.copy()
            trial[i] = h
            if oo.evaluate(inst, trial, weights=False).objective < base - tol * abs(inst.full_objective):
                return False, (g, h)
    return True, None


def test_identity_hessian_gives_magnitude_pruning(rng):
    """With H = I the objective is separable: keep the groups of largest norm."""
    p, b = 12, 3
    W = rng.standard_normal((p * b, 4)) * rng.uniform(0.1, 3.0, size=(p * b, 1))
    inst = oo.Instance(np.eye(p * b), W, 5, group_size=b)
    norms = np.linalg.norm(W.reshape(p, b, 4), axis=(1, 2))
    sol = oo.solve(inst, "osscar")
    assert sol.keep.tolist() == sorted(np.argsort(-norms)[:5].tolist())
    np.testing.assert_allclose(sol.weights, np.where(np.isin(inst.groups, sol.keep)[:, None], W, 0), atol=1e-12)


def test_finds_the_optimum_on_random_small_instances(rng):
    """At least 95% of 200 random instances (p <= 12); never worse than greedy;
    no single swap improves at the end."""
    hits = 0
    for trial in range(200):
        p = int(rng.integers(3, 13))
        b = int(rng.choice([1, 1, 2, 4]))
        keep = int(rng.integers(1, p))
        inst = random_instance(rng, p=p, group_size=b, keep=keep, m=int(rng.integers(1, 8)))
        sol = oo.solve(inst, "osscar", device="cpu")
        greedy = oo.solve(inst, "osscar", device="cpu", local_search=False)
        optimum, _ = brute_force(inst)
        assert sol.objective <= greedy.objective + 1e-12 * abs(inst.full_objective)
        if trial % 10 == 0:
            ok, pair = _no_single_swap_improves(inst, sol.keep)
            assert ok, f"swap {pair} still improves"
        hits += sol.objective <= optimum + 1e-9 * abs(inst.full_objective)
    assert hits >= 190, f"optimal on {hits}/200"


def test_no_single_swap_improves_on_a_larger_instance(rng):
    inst = random_instance(rng, p=40, group_size=2, keep=17, m=9, n=300)
    sol = oo.solve(inst, "osscar", pair_swap_limit=0)
    ok, pair = _no_single_swap_improves(inst, sol.keep)
    assert ok, f"swap {pair} still improves"


def test_partition_budgets_are_honoured(rng):
    """GQA-style side constraint: every part keeps its budget; near-always optimal."""
    hits = 0
    for trial in range(20):
        parts = np.repeat(np.arange(3 + trial % 2), 3)
        n_parts = parts.max() + 1
        keep = n_parts * (1 + trial % 2)
        inst = random_instance(rng, p=parts.size, group_size=int(rng.choice([1, 2, 4])), keep=keep, partition=parts)
        sol = oo.solve(inst, "osscar")
        assert np.bincount(parts[sol.keep], minlength=n_parts).tolist() == [keep // n_parts] * n_parts
        optimum, _ = brute_force(inst)
        hits += sol.objective <= optimum + 1e-9 * abs(inst.full_objective)
    assert hits >= 18, f"optimal on {hits}/20"


@pytest.mark.parametrize("keep", [0, 1, 11, 12])
def test_extreme_keeps(rng, keep):
    inst = random_instance(rng, p=12, group_size=2, keep=keep)
    sol = oo.solve(inst, "osscar", swap_size=64)  # a swap size larger than the groups must not crash
    assert sol.keep.size == keep and sol.status == oo.Status.FEASIBLE
    if keep == 12:
        assert sol.err == pytest.approx(0.0, abs=1e-12)
    if keep == 0:
        assert sol.err == 1.0


def test_dead_inputs_are_pruned_first(rng):
    """Rows never active before damping (zero Gram diagonal) cost little to drop."""
    dead = [0, 1, 6, 7]  # groups 0 and 3 of size 2
    inst = random_instance(rng, p=8, group_size=2, keep=6, dead=dead)
    sol = oo.solve(inst, "osscar")
    optimum, best = brute_force(inst)
    assert sol.objective == pytest.approx(optimum, rel=1e-10)
    assert 0 not in sol.keep and 3 not in sol.keep


def test_uneven_groups(rng):
    base = random_instance(rng, p=14, keep=3)
    groups = [0, 0, 1, 2, 2, 2, 3, 1, 4, 4, 3, 0, 5, 5]
    inst = oo.Instance(base.H, base.W, 3, groups=groups)
    sol = oo.solve(inst, "osscar")
    optimum, _ = brute_force(inst)
    assert sol.objective == pytest.approx(optimum, rel=1e-10)


def test_float32_picks_a_support_as_good_as_float64(rng):
    inst = random_instance(rng, p=64, keep=32, m=16, n=2000)
    s64 = oo.solve(inst, "osscar", device="cpu")
    s32 = oo.solve(inst, "osscar", device="cpu", dtype="float32")
    assert s32.keep.size == 32
    assert s32.err <= s64.err * 1.001


def test_low_memory_mode_chooses_the_same_support(rng):
    """H leaves the device during the greedy and returns for the local search."""
    for b, p in ((1, 120), (3, 30)):
        inst = random_instance(rng, p=p, group_size=b, keep=p // 2, m=6, n=2000)
        plain = oo.solve(inst, "osscar", device="cpu")
        low = oo.solve(inst, "osscar", device="cpu", low_memory=True)
        assert low.keep.tolist() == plain.keep.tolist()
        assert low.err == plain.err
        assert low.info["single_swaps"] == plain.info["single_swaps"]


def test_time_limit_returns_a_feasible_support(rng):
    inst = random_instance(rng, p=300, keep=150, m=20, n=1000)
    sol = oo.solve(inst, "osscar", time_limit=1e-6)
    assert sol.status == oo.Status.TIME_LIMIT
    assert sol.keep.size == 150 and np.isfinite(sol.err)


def test_cuda_request_without_cuda_is_a_clear_error(small_instance):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the error path cannot be exercised")
    with pytest.raises(oo.SolverError, match="cuda.*is_available"):
        oo.solve(small_instance, "osscar", device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_and_cpu_choose_the_same_support(rng):
    for b, p in ((1, 256), (16, 24)):
        inst = random_instance(rng, p=p, group_size=b, keep=p // 2, m=32, n=4000)
        cpu = oo.solve(inst, "osscar", device="cpu")
        gpu = oo.solve(inst, "osscar", device="cuda")
        assert gpu.device.startswith("cuda")
        assert gpu.keep.tolist() == cpu.keep.tolist()
        assert gpu.err == pytest.approx(cpu.err, rel=1e-9)
