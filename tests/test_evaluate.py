import numpy as np
import pytest
import torch

import osscar_opt as oo
from osscar_opt import InstanceError

from conftest import plain_objective, random_activations


def test_evaluator_matches_a_direct_least_squares_fit_on_X(rng):
    """err(S) is the ridge-regularized reconstruction error of a refit on S."""
    n, d, m, damping = 400, 15, 7, 0.02
    X = random_activations(rng, n, d)
    W_hat = rng.standard_normal((d, m))
    inst = oo.Instance.from_activations(X, W_hat, 6, damping=damping)
    lam = damping * np.mean(np.sum(X * X, 0) / n)
    S = np.array([0, 2, 3, 7, 11, 14])
    # minimize ||X_S W_S - X W_hat||^2 / n + lam ||W - W_hat||^2 with rows outside S zero
    A = np.vstack([X[:, S] / np.sqrt(n), np.sqrt(lam) * np.eye(S.size)])
    B = np.vstack([X @ W_hat / np.sqrt(n), np.sqrt(lam) * W_hat[S]])
    W_S, *_ = np.linalg.lstsq(A, B, rcond=None)
    W_full = np.zeros_like(W_hat)
    W_full[S] = W_S
    loss = np.sum((X @ (W_full - W_hat)) ** 2) / n + lam * np.sum((W_full - W_hat) ** 2)
    total = np.sum((X @ W_hat) ** 2) / n + lam * np.sum(W_hat**2)  # the loss of pruning everything
    ev = oo.evaluate(inst, S)
    assert ev.err == pytest.approx(loss / total, rel=1e-9)
    np.testing.assert_allclose(ev.weights, W_full, rtol=1e-8, atol=1e-10)
    assert ev.objective == pytest.approx(plain_objective(inst, S), rel=1e-12)


def test_err_is_zero_for_everything_and_one_for_nothing(small_instance):
    inst = small_instance
    assert oo.evaluate(inst, range(inst.n_groups)).err == pytest.approx(0.0, abs=1e-12)
    empty = oo.evaluate(inst, [])
    assert empty.err == 1.0 and not np.any(empty.weights)


def test_weights_vanish_outside_the_support_and_are_stationary_on_it(small_instance):
    inst = small_instance
    ev = oo.evaluate(inst, [1, 4, 5, 8])
    rows = inst.rows_of([1, 4, 5, 8])
    outside = np.setdiff1d(np.arange(inst.d), rows)
    assert not np.any(ev.weights[outside])
    gradient = inst.H @ ev.weights - inst.H @ inst.W  # H W - G
    np.testing.assert_allclose(gradient[rows], 0, atol=1e-9)
    assert ev.feasible


def test_a_boolean_mask_is_the_support_of_its_true_groups(small_instance):
    mask = np.zeros(small_instance.n_groups, bool)
    mask[[1, 4, 5, 8]] = True
    assert oo.evaluate(small_instance, mask).objective == oo.evaluate(small_instance, [1, 4, 5, 8]).objective


@pytest.mark.parametrize("support, message", [([0, 0, 1, 2], "duplicate"), ([0, 99], "must lie in"), ([[0, 1]], "1-D"),
                                              ([True, False], "boolean support is a mask over the")])
def test_bad_supports_are_refused(small_instance, support, message):
    with pytest.raises(InstanceError, match=message):
        oo.evaluate(small_instance, support)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluation_on_cuda_gives_the_cpu_values(small_instance):
    S = list(range(small_instance.keep))
    cpu = oo.evaluate(small_instance, S)
    gpu = oo.evaluate(small_instance, S, device="cuda")
    assert gpu.objective == pytest.approx(cpu.objective, rel=1e-12)
    np.testing.assert_allclose(gpu.weights, cpu.weights, rtol=1e-9, atol=1e-12)


def test_deployed_is_the_refit_or_the_target_rows_on_the_support():
    """What a method deploys on a support: with refit, the evaluator's weights
    and err; without, W_hat's rows of the kept groups (the rest zero), whose
    err is evaluate_masked's and its quadratic form's."""
    from conftest import random_instance
    from osscar_opt.evaluate import deployed, evaluate, evaluate_masked

    inst = random_instance(np.random.default_rng(3), p=6, group_size=2, keep=3)
    S, W, err = deployed(inst, [4, 0, 2])
    ev = evaluate(inst, [0, 2, 4])
    assert S.tolist() == [0, 2, 4] and err == ev.err and np.array_equal(W, ev.weights)
    S, W, err = deployed(inst, [4, 0, 2], refits=False)
    rows = np.concatenate([np.arange(2 * g, 2 * g + 2) for g in (0, 2, 4)])
    assert np.array_equal(W[rows], inst.W[rows]) and not np.delete(W, rows, axis=0).any()
    D = W - inst.W
    by_hand = 0.5 * np.einsum("ij,ij->", D, inst.H @ D) / -inst.full_objective
    assert err == evaluate_masked(inst, S)[1] and err == pytest.approx(by_hand, rel=1e-10) and err > ev.err
