import numpy as np
import pytest

import osscar_opt as oo
from osscar_opt import InstanceError

from conftest import random_activations, random_instance


def test_from_activations_builds_the_damped_gram(rng):
    X = random_activations(rng, 300, 12)
    W = rng.standard_normal((12, 4))
    inst = oo.Instance.from_activations(X, W, 5, damping=0.05)
    gram = X.T @ X / 300
    expected = gram + 0.05 * np.mean(np.diag(gram)) * np.eye(12)
    np.testing.assert_allclose(inst.H, expected, rtol=1e-13, atol=1e-13)
    assert inst.meta["damping"] == 0.05 and inst.meta["samples"] == 300
    assert (inst.d, inst.m, inst.n_groups, inst.keep) == (12, 4, 12, 5)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda H, W: oo.Instance(H[:, :-1], W, 2), "square"),
        (lambda H, W: oo.Instance(H, W[:-1], 2), "W must be d x m"),
        (lambda H, W: oo.Instance(np.where(np.eye(len(H)) > 0, np.nan, H), W, 2), "NaN or Inf"),
        (lambda H, W: oo.Instance(H, np.full_like(W, np.inf), 2), "NaN or Inf"),
        (lambda H, W: oo.Instance(H + np.triu(np.ones_like(H), 1), W, 2), "not symmetric"),
        (lambda H, W: oo.Instance(H - 10 * np.max(np.diag(H)) * np.eye(len(H)), W, 2), "not positive definite"),
        (lambda H, W: oo.Instance(H, W, 7), "out of range"),
        (lambda H, W: oo.Instance(H, W, -1), "out of range"),
        (lambda H, W: oo.Instance(H, W, 1.5), "integer"),
        (lambda H, W: oo.Instance(H, W, 1, group_size=4), "does not divide"),
        (lambda H, W: oo.Instance(H, W, 1, groups=[0, 0, 2, 2, 3, 3]), "do not tile"),
        (lambda H, W: oo.Instance(H, W, 1, groups=[0, 1, 2]), "one group id per row"),
        (lambda H, W: oo.Instance(H, W, 3, partition=[0, 0, 0, 1, 1, 1], group_size=1), "split evenly"),
        (lambda H, W: oo.Instance(H, W, 3, partition=([0, 0, 0, 1, 1, 1], [3, 1])), "sum to 4 but keep=3"),
        (lambda H, W: oo.Instance(H, W, 4, partition=([0, 0, 0, 1, 1, 1], [4, 0])), "infeasible"),
        (lambda H, W: oo.Instance(H, 0 * W, 2), "all zero"),
    ],
)
def test_bad_input_raises_one_clear_error(rng, make, message):
    inst = random_instance(rng, p=6, keep=2)
    with pytest.raises(InstanceError, match=message) as info:
        make(inst.H.copy(), inst.W.copy())
    assert "\n" not in str(info.value)


def test_all_zero_activations_are_refused(rng):
    with pytest.raises(InstanceError, match="all zero"):
        oo.Instance.from_activations(np.zeros((10, 4)), rng.standard_normal((4, 2)), 2)


def test_groups_and_group_size_agree(rng):
    inst = random_instance(rng, p=4, group_size=3, keep=2)
    same = oo.Instance(inst.H, inst.W, 2, groups=np.repeat(np.arange(4), 3))
    assert same.group_size == 3
    assert [list(r) for r in same.group_rows] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    uneven = oo.Instance(inst.H, inst.W, 2, groups=[2, 0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 0])
    assert uneven.group_size is None
    assert list(uneven.group_sizes) == [3, 3, 2, 4]
    assert list(uneven.rows_of([0, 2])) == [0, 1, 2, 6, 11]


def test_partition_budget_is_derived_evenly(rng):
    inst = random_instance(rng, p=9, keep=6, partition=np.repeat(np.arange(3), 3))
    assert inst.partition.budget.tolist() == [2, 2, 2]
    explicit = inst.with_keep(5, budget=[1, 2, 2])
    assert explicit.partition.budget.tolist() == [1, 2, 2]


def test_crop_is_the_sub_instance(rng):
    inst = random_instance(rng, p=8, group_size=2, keep=4)
    sub = inst.crop([6, 1, 3])
    rows = np.r_[12, 13, 2, 3, 6, 7]
    np.testing.assert_array_equal(sub.H, inst.H[np.ix_(rows, rows)])
    np.testing.assert_array_equal(sub.W, inst.W[rows])
    assert sub.n_groups == 3 and sub.keep == 2  # same kept fraction, rounded
    assert sub.meta["crop_of"]["groups"] == [6, 1, 3]
    # a crop is the layer restricted to those inputs: its own G = H_cc W_c
    Wc = inst.W[rows]
    assert sub.full_objective == pytest.approx(-0.5 * np.sum(Wc * (inst.H[np.ix_(rows, rows)] @ Wc)), rel=1e-12)


def test_keep_for_sparsity(rng):
    inst = random_instance(rng, p=10, keep=5)
    assert inst.keep_for_sparsity(0.3) == 7
    with pytest.raises(InstanceError, match="sparsity"):
        inst.keep_for_sparsity(1.5)
