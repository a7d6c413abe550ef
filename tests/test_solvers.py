"""Conformance of every registered solver (benchopt / cvxpy style)."""

import time

import numpy as np
import pytest

import osscar_opt as oo
from osscar_opt import SolverError
from osscar_opt.registry import get_solver

from conftest import brute_force, plain_objective, random_instance

SOLVERS = [info.name for info in oo.solvers()]


def _cases(rng):
    yield "neurons", random_instance(rng, p=10, group_size=1, keep=4, m=6)
    yield "heads", random_instance(rng, p=6, group_size=4, keep=3, m=5)
    yield "gqa", random_instance(rng, p=9, group_size=2, keep=6, m=4, partition=np.repeat(np.arange(3), 3))
    H = random_instance(rng, p=12, keep=2).H
    yield "uneven", oo.Instance(H, rng.standard_normal((12, 3)), 2, groups=[0, 0, 1, 2, 2, 2, 3, 1, 4, 4, 3, 0])


@pytest.mark.parametrize("name", SOLVERS)
def test_solver_conformance(name, rng):
    info = next(i for i in oo.solvers() if i.name == name)
    if not info.available:
        pytest.skip(f"{name} unavailable here: {info.reason}")
    for label, inst in _cases(rng):
        cls = get_solver(name)
        skip, why = cls().skip(inst, cls.Params())
        if skip:
            assert why, f"{name} skips {label} without a reason"
            continue
        sol = oo.solve(inst, name, device="cpu")
        assert sol.status in (oo.Status.OPTIMAL, oo.Status.FEASIBLE), (label, sol.message)
        assert sol.keep.size == inst.keep, label
        assert np.array_equal(sol.keep, np.unique(sol.keep))
        if inst.partition is not None:
            counts = np.bincount(inst.partition.parts[sol.keep], minlength=inst.partition.n_parts)
            assert counts.tolist() == inst.partition.budget.tolist(), label
        # the reported objective is the evaluator's, and an independent solve agrees
        assert sol.objective == oo.evaluate(inst, sol.keep).objective
        assert sol.objective == pytest.approx(plain_objective(inst, sol.keep), rel=1e-10)
        assert 0.0 <= sol.err <= 1.0
        if sol.bound is not None:
            optimum, _ = brute_force(inst)
            assert sol.bound <= optimum + 1e-9 * abs(inst.full_objective), label
        if sol.status == oo.Status.OPTIMAL:
            optimum, _ = brute_force(inst)
            assert sol.objective == pytest.approx(optimum, rel=1e-10), label
        assert sol.seconds >= 0 and isinstance(sol.params, dict)


def test_exact_solvers_match_brute_force(rng):
    exact = [i.name for i in oo.solvers() if i.exact and i.available]
    assert "enumerate" in exact
    for trial in range(5):
        inst = random_instance(rng, p=9, group_size=2, keep=int(rng.integers(1, 9)), m=3)
        optimum, best = brute_force(inst)
        for name in exact:
            sol = oo.solve(inst, name, device="cpu")
            assert sol.status == oo.Status.OPTIMAL
            assert sol.objective == pytest.approx(optimum, rel=1e-10), name


def test_unknown_solver_and_parameter_are_clear_errors(small_instance):
    with pytest.raises(SolverError, match="unknown solver 'nope'.*osscar"):
        oo.solve(small_instance, "nope")
    with pytest.raises(SolverError, match="no parameter 'swaps'.*swap_size"):
        oo.solve(small_instance, "osscar", swaps=3)
    with pytest.raises(SolverError, match="swap_size must be a positive"):
        oo.solve(small_instance, "osscar", swap_size=0)
    with pytest.raises(SolverError, match="time_limit"):
        oo.solve(small_instance, "osscar", time_limit=-1)
    with pytest.raises(SolverError, match=r"keep is not a solver parameter: .*with_keep"):
        oo.solve(small_instance, "osscar", keep=3)
    with pytest.raises(oo.InstanceError, match="solve expects an Instance or the path of an instance file, got list"):
        oo.solve([[1.0]], "osscar")


def test_solve_takes_an_instance_file_path(small_instance, tmp_path):
    path = oo.save_instance(small_instance, tmp_path / "layer.npz")
    for given in (path, str(path)):
        sol = oo.solve(given, "enumerate")
        assert sol.status == oo.Status.OPTIMAL and sol.err == oo.solve(small_instance, "enumerate").err


def test_enumerate_skips_large_instances_with_a_reason(rng):
    inst = random_instance(rng, p=40, keep=20, m=2)
    with pytest.raises(SolverError, match="skips this instance: .* supports exceed max_supports"):
        oo.solve(inst, "enumerate")


@pytest.mark.parametrize("partition", [None, np.arange(9) % 3])
def test_enumerate_tree_and_batched_methods_agree_with_brute_force(rng, partition):
    """The prefix-tree walk (Schur complements) and the batched Cholesky path are two
    independent exact methods: both must find the brute-force optimum."""
    for keep in (3, 6, 9) if partition is not None else (1, 4, 7, 9):
        inst = random_instance(rng, p=9, group_size=4, keep=keep, m=5, partition=partition)
        optimum, best = brute_force(inst)
        for method in ("tree", "batched"):
            sol = oo.solve(inst, "enumerate", device="cpu", method=method)
            assert sol.status == oo.Status.OPTIMAL
            assert sol.objective == pytest.approx(optimum, rel=1e-10), method
            assert sol.bound == pytest.approx(optimum, rel=1e-10), method
            if partition is not None:
                assert np.bincount(partition[list(sol.keep)], minlength=3).tolist() == inst.partition.budget.tolist()


def test_enumerate_tree_time_limit(rng):
    inst = random_instance(rng, p=24, group_size=4, keep=12, m=3)
    start = time.perf_counter()
    sol = oo.solve(inst, "enumerate", time_limit=0.2, method="tree", max_supports=10**8)
    assert time.perf_counter() - start < 3.0
    assert sol.status == oo.Status.TIME_LIMIT and sol.bound is None


def test_time_limit_holds_and_reports_time_limit(rng):
    inst = random_instance(rng, p=22, keep=11, m=3)
    start = time.perf_counter()
    sol = oo.solve(inst, "enumerate", time_limit=0.05, batch=64)
    assert time.perf_counter() - start < 2.0
    assert sol.status == oo.Status.TIME_LIMIT and sol.bound is None


def test_registry_lists_every_solver_with_availability():
    rows = oo.solvers()
    names = [r.name for r in rows]
    assert names[0] == "osscar" and "enumerate" in names
    for r in rows:
        assert isinstance(r.available, bool) and (r.available or r.reason)


def test_small_cpu_solves_run_on_one_thread_and_restore_the_setting(rng):
    import torch

    from osscar_opt.registry import SINGLE_THREAD_ROWS, make_params, solve_threads

    small = random_instance(rng, p=12, keep=6, m=4)
    large = random_instance(rng, p=SINGLE_THREAD_ROWS + 1, keep=8, m=2)
    osscar_params = make_params(get_solver("osscar"), {})
    assert solve_threads(small, "cpu", osscar_params) == 1
    # larger ones: the process setting, or fewer threads while other processes keep cores busy
    assert solve_threads(large, "cpu", osscar_params) in (None, *range(1, torch.get_num_threads()))
    assert solve_threads(small, "cuda", osscar_params) is None
    assert solve_threads(small, "cpu", make_params(get_solver("bnb"), {})) is None  # bnb sets its own
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        sol = oo.solve(small, "osscar", device="cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert sol.keep.size == small.keep and sol.objective >= brute_force(small)[0] - 1e-9 * abs(small.full_objective)


def test_large_cpu_solves_leave_the_cores_that_other_processes_keep_busy(rng):
    """With every core busy elsewhere, a solve above SINGLE_THREAD_ROWS runs on one thread
    (OpenMP threads spin as they wait for busy cores), and finds the same support."""
    import os
    import subprocess
    import sys
    import time

    import torch

    from osscar_opt.linalg import busy_elsewhere, spare_thread_cap
    from osscar_opt.registry import SINGLE_THREAD_ROWS, make_params, solve_threads

    large = random_instance(rng, p=SINGLE_THREAD_ROWS + 1, keep=8, m=2)
    idle = oo.solve(large, "osscar", device="cpu")
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.5)
        torch.set_num_threads(2)
        assert busy_elsewhere() >= 1
        assert spare_thread_cap() == 1
        assert solve_threads(large, "cpu", make_params(get_solver("osscar"), {})) == 1
        busy = oo.solve(large, "osscar", device="cpu")
        assert torch.get_num_threads() == 2
    finally:
        for p in loops:
            p.kill()
            p.wait()
        torch.set_num_threads(before)
    np.testing.assert_array_equal(busy.keep, idle.keep)
