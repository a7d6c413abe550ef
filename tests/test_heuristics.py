"""The baseline heuristics: each one's defining property against an independent computation."""

import itertools

import numpy as np
import pytest
import torch

import osscar_opt as oo
from osscar_opt import SolverError

from conftest import plain_objective, random_instance

HEURISTICS = ["magnitude", "magnitude-refit", "activation", "obs-greedy", "forward", "iht", "random"]


def group_rows(inst, g):
    return np.flatnonzero(inst.groups == g)


def top_per_part(inst, scores):
    """The keep largest scores (ties: lower id), per part under a partition, by plain sorting."""
    if inst.partition is None:
        return sorted(np.argsort(-scores, kind="stable")[: inst.keep].tolist())
    out = []
    for j, budget in enumerate(inst.partition.budget):
        members = np.flatnonzero(inst.partition.parts == j)
        out += members[np.argsort(-scores[members], kind="stable")[:budget]].tolist()
    return sorted(out)


def allowed(inst, S, final):
    """Partition feasibility of a partial support (<= budget) or a final one (== budget)."""
    if inst.partition is None:
        return True
    counts = np.bincount(inst.partition.parts[list(S)], minlength=inst.partition.n_parts)
    return bool(np.all(counts == inst.partition.budget) if final else np.all(counts <= inst.partition.budget))


def plain_obs_greedy(inst):
    """Remove one group at a time, the one of least OBS cost 0.5 tr(W_g' [Hinv_gg]^-1 W_g).

    Recomputes H_SS^-1 with numpy's generic inverse at every step (no Woodbury).
    """
    S = list(range(inst.p))
    G = inst.H @ inst.W
    sizes = np.bincount(inst.groups)
    caps = None if inst.partition is None else np.bincount(inst.partition.parts) - inst.partition.budget
    while len(S) > inst.keep:
        rows = np.concatenate([group_rows(inst, g) for g in S])
        Hinv = np.linalg.inv(inst.H[np.ix_(rows, rows)])
        W = Hinv @ G[rows]
        best = (np.inf, None)
        start = 0
        for g in S:
            pos = np.arange(start, start + sizes[g])
            start += sizes[g]
            if caps is not None and caps[inst.partition.parts[g]] == 0:
                continue
            cost = 0.5 * np.trace(W[pos].T @ np.linalg.solve(Hinv[np.ix_(pos, pos)], W[pos]))
            if cost < best[0]:
                best = (cost, g)
        S.remove(best[1])
        if caps is not None:
            caps[inst.partition.parts[best[1]]] -= 1
    return S


def plain_forward(inst):
    """Add one group at a time, the one whose addition gives the lowest f (plain objective)."""
    S = []
    while len(S) < inst.keep:
        candidates = [g for g in range(inst.p) if g not in S and allowed(inst, S + [g], final=False)]
        values = [plain_objective(inst, S + [g]) for g in candidates]
        S.append(candidates[int(np.argmin(values))])
    return S


def _uneven(rng):
    H = random_instance(rng, p=14, keep=2).H
    groups = [0, 0, 1, 2, 2, 2, 3, 1, 4, 4, 3, 0, 5, 5]
    return oo.Instance(H, rng.standard_normal((14, 3)), 3, groups=groups)


def _cases(rng):
    yield random_instance(rng, p=12, group_size=1, keep=5, m=4)
    yield random_instance(rng, p=8, group_size=3, keep=3, m=7)
    yield random_instance(rng, p=9, group_size=2, keep=6, m=3, partition=np.repeat(np.arange(3), 3))
    yield _uneven(rng)


# ------------------------------------------------------------------ score based
def test_magnitude_keeps_largest_group_norms_and_reports_the_no_refit_error(rng):
    inst = random_instance(rng, p=12, group_size=3, keep=5, m=4)
    norms = np.array([np.linalg.norm(inst.W[group_rows(inst, g)]) for g in range(inst.p)])
    sol = oo.solve(inst, "magnitude")
    assert sol.keep.tolist() == top_per_part(inst, norms)
    # err_no_refit: the err of W_hat with the pruned rows zeroed, no refit
    Wm = np.zeros_like(inst.W)
    rows = np.concatenate([group_rows(inst, g) for g in sol.keep])
    Wm[rows] = inst.W[rows]
    q = 0.5 * np.sum(Wm * (inst.H @ Wm)) - np.sum((inst.H @ inst.W) * Wm)
    expected = (q - inst.full_objective) / (-inst.full_objective)
    assert sol.info["refit"] is False
    assert sol.info["err_no_refit"] == pytest.approx(expected, rel=1e-10)
    # `err` is always the refit's, which can only be better
    assert sol.err == oo.evaluate(inst, sol.keep).err
    assert sol.err < sol.info["err_no_refit"]
    refit = oo.solve(inst, "magnitude-refit")
    assert refit.keep.tolist() == sol.keep.tolist() and refit.info["refit"] is True
    assert np.allclose(refit.weights[rows], np.linalg.solve(inst.H[np.ix_(rows, rows)], (inst.H @ inst.W)[rows]))


def test_activation_scales_rows_by_sqrt_diag_h(rng):
    # group 0: large weights, nearly silent inputs; group 1: small weights, loud inputs
    X = rng.standard_normal((400, 10)) * np.array([0.01, 0.01, 10, 10, 1, 1, 1, 1, 1, 1])
    W = rng.standard_normal((10, 4)) * np.array([5, 5, 0.5, 0.5, 1, 1, 1, 1, 1, 1])[:, None]
    inst = oo.Instance.from_activations(X, W, 2, group_size=2, damping=1e-4)
    scaled = inst.W * np.sqrt(np.diag(inst.H))[:, None]
    scores = np.array([np.linalg.norm(scaled[group_rows(inst, g)]) for g in range(inst.p)])
    norms = np.array([np.linalg.norm(inst.W[group_rows(inst, g)]) for g in range(inst.p)])
    sol = oo.solve(inst, "activation")
    assert sol.keep.tolist() == top_per_part(inst, scores)
    assert sol.keep.tolist() != top_per_part(inst, norms)  # the scaling changed the choice here
    assert sol.info["refit"] is False and sol.info["err_no_refit"] > sol.err


def test_random_is_reproducible_with_its_seed_and_differs_across_seeds(rng):
    inst = random_instance(rng, p=30, keep=15, m=2)
    a, b = oo.solve(inst, "random", seed=7), oo.solve(inst, "random", seed=7)
    assert a.keep.tolist() == b.keep.tolist() and a.params == {"seed": 7}
    assert a.keep.tolist() != oo.solve(inst, "random", seed=8).keep.tolist()
    seen = {tuple(oo.solve(inst, "random", seed=s).keep) for s in range(10)}
    assert len(seen) == 10


# ---------------------------------------------------------------- elimination
@pytest.mark.parametrize("lazy_rank", [1, 2, 128])
def test_obs_greedy_equals_plain_one_group_at_a_time_obs(rng, lazy_rank):
    for inst in _cases(rng):
        sol = oo.solve(inst, "obs-greedy", device="cpu", lazy_rank=lazy_rank)
        expected = plain_obs_greedy(inst)
        assert sol.keep.tolist() == sorted(expected)
        assert set(sol.info["removed"]) == set(range(inst.p)) - set(expected)


def test_obs_greedy_across_many_lazy_blocks(rng):
    inst = random_instance(rng, p=40, group_size=1, keep=9, m=5)
    sol = oo.solve(inst, "obs-greedy", device="cpu", lazy_rank=4)  # 8 dense updates and shrinks
    assert sol.keep.tolist() == sorted(plain_obs_greedy(inst))


@pytest.mark.parametrize("lazy_rank", [1, 128])
def test_forward_adds_the_best_group_every_step(rng, lazy_rank):
    for inst in _cases(rng):
        sol = oo.solve(inst, "forward", device="cpu", lazy_rank=lazy_rank)
        # first pick: the best single group by brute force
        singles = [plain_objective(inst, [g]) if allowed(inst, [g], final=False) else np.inf for g in range(inst.p)]
        assert sol.info["added"][0] == int(np.argmin(singles))
        assert sol.info["added"] == plain_forward(inst)


def test_forward_across_many_lazy_blocks(rng):
    inst = random_instance(rng, p=40, group_size=1, keep=25, m=3)
    sol = oo.solve(inst, "forward", device="cpu", lazy_rank=4)
    assert sol.info["added"] == plain_forward(inst)


# ------------------------------------------------------------------------ IHT
def _iht_fixed_point(inst, sol):
    """True when one IHT step from the refit weights on sol.keep keeps that support."""
    L = sol.info["lipschitz"]
    lam = np.linalg.eigvalsh(inst.H)[-1]
    assert lam * (1 - 1e-9) <= L <= 1.01 * lam  # a valid step 1/L, not a much smaller one
    W = sol.weights  # optimal weights on the support (the evaluator's)
    V = W + (inst.H @ inst.W - inst.H @ W) / L
    norms = np.array([np.linalg.norm(V[group_rows(inst, g)]) for g in range(inst.p)])
    return top_per_part(inst, norms) == sol.keep.tolist()


def test_iht_support_is_a_fixed_point(rng):
    for inst in itertools.chain(_cases(rng), [random_instance(rng, p=4, group_size=2, keep=2, m=20)]):
        sol = oo.solve(inst, "iht", device="cpu")
        assert sol.info["converged"], sol.info
        assert _iht_fixed_point(inst, sol)


def test_iht_leaves_a_magnitude_support_that_is_not_a_fixed_point():
    # an instance (found by search) where the magnitude start is not IHT-stationary
    inst = random_instance(np.random.default_rng(11), p=8, keep=3, m=2)
    sol = oo.solve(inst, "iht", device="cpu")
    start = oo.solve(inst, "magnitude-refit")
    assert sol.info["converged"] and _iht_fixed_point(inst, sol)
    assert sol.keep.tolist() != start.keep.tolist() and sol.err < start.err


def test_iht_stops_at_max_iter_with_a_feasible_support(rng):
    inst = random_instance(rng, p=20, keep=7, m=3)
    sol = oo.solve(inst, "iht", device="cpu", max_iter=1)
    assert sol.info["iterations"] == 1 and sol.keep.size == 7


# ------------------------------------------------------------ every heuristic
@pytest.mark.parametrize("name", HEURISTICS)
def test_partition_budgets_are_honoured(rng, name):
    parts = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    inst = random_instance(rng, p=12, group_size=2, keep=5, m=3, partition=(parts, [3, 0, 2]))
    sol = oo.solve(inst, name, device="cpu")
    assert np.bincount(parts[sol.keep], minlength=3).tolist() == [3, 0, 2]
    assert sol.status == oo.Status.FEASIBLE


def test_score_heuristics_take_the_top_of_every_part(rng):
    parts = np.repeat(np.arange(3), 4)
    inst = random_instance(rng, p=12, keep=6, m=3, partition=(parts, [1, 2, 3]))
    norms = np.linalg.norm(inst.W, axis=1)
    assert oo.solve(inst, "magnitude").keep.tolist() == top_per_part(inst, norms)
    scores = norms * np.sqrt(np.diag(inst.H))
    assert oo.solve(inst, "activation").keep.tolist() == top_per_part(inst, scores)


@pytest.mark.parametrize("name", HEURISTICS)
def test_keep_none_or_all(rng, name):
    inst = random_instance(rng, p=6, group_size=2, keep=0, m=3)
    assert oo.solve(inst, name, device="cpu").keep.size == 0
    full = oo.solve(inst.with_keep(6), name, device="cpu")
    assert full.keep.tolist() == list(range(6)) and full.err == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", ["obs-greedy", "forward", "iht"])
def test_float32_gives_the_float64_support_on_a_well_conditioned_instance(rng, name):
    inst = random_instance(rng, p=16, group_size=2, keep=6, m=4, damping=0.5)
    a = oo.solve(inst, name, device="cpu")
    b = oo.solve(inst, name, device="cpu", dtype="float32")
    assert a.keep.tolist() == b.keep.tolist()


def test_bad_parameters_are_one_line_errors(small_instance):
    with pytest.raises(SolverError, match="dtype must be one of float64, float32"):
        oo.solve(small_instance, "obs-greedy", dtype="float16")
    with pytest.raises(SolverError, match="lazy_rank must be a positive integer"):
        oo.solve(small_instance, "forward", lazy_rank=0)
    with pytest.raises(SolverError, match="seed must be a non-negative integer"):
        oo.solve(small_instance, "random", seed=-1)
    with pytest.raises(SolverError, match="patience must be a positive integer"):
        oo.solve(small_instance, "iht", patience=0)
    with pytest.raises(SolverError, match="device 'cuda' is not supported by this solver"):
        oo.solve(small_instance, "magnitude", device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["obs-greedy", "forward", "iht"])
def test_cuda_gives_the_cpu_support(rng, name):
    for inst in _cases(rng):
        assert oo.solve(inst, name, device="cuda").keep.tolist() == oo.solve(inst, name, device="cpu").keep.tolist()
