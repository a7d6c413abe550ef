"""Score-and-select baselines: magnitude, magnitude + refit, activation (Wanda).

Each keeps the `keep` groups of largest score (with a partition: the budget[j]
largest of every part j). Scores are O(d m) passes over the fp64 instance on
the host, so these solvers run on the CPU only.

About `err` for the no-refit heuristics (magnitude, activation): a Solution is
a support, and its `objective`, `err` and `weights` always come from the one
fp64 evaluator, i.e. from the optimal least-squares refit on that support. What
the heuristic itself would deploy, W_hat with the pruned rows zeroed, is
reported next to it in `info` by the registry (`refits = False`, see
`osscar_opt.registry.finish`), and the Solution's `weights` are W_hat masked:

    info["err_no_refit"]       = 0.5 tr(D'HD) / (-f(all)),  D = W_hat masked - W_hat
    info["objective_no_refit"] = 0.5 tr(D'HD) + f(all)

(q(W) = 0.5 tr(W'HW) - tr(G'W) equals 0.5 tr((W - W_hat)'H(W - W_hat)) + f(all),
so err_no_refit is the err scale applied to q(W_hat masked)). Callers that
apply the mask without a refit should use `info["err_no_refit"]` and W_hat;
`magnitude` and `magnitude-refit` return the same support and differ only in
this information.
"""

from __future__ import annotations

import numpy as np

from osscar_opt.registry import NoParams, Result, Solver, Status, register

from ._common import group_sq_norms, select_top


def magnitude_scores(instance) -> np.ndarray:
    """||W_hat_g||_F^2 = sum_{i in g} ||W_hat_i||^2 for every group g (no size normalization)."""
    return group_sq_norms(instance, np.einsum("ij,ij->i", instance.W, instance.W))


def activation_scores(instance) -> np.ndarray:
    """sum_{i in g} H_ii ||W_hat_i||^2: the squared group norm of the Wanda scores.

    Wanda scores a weight by |W_ij| ||X_i||_2; with H = X'X/n + damping, H_ii is
    ||X_i||^2/n plus the damping (the same constant for every row), so this is
    the Frobenius norm of the Wanda scores of the group, squared, up to 1/n.
    """
    rows = np.einsum("ij,ij->i", instance.W, instance.W) * np.diag(instance.H)
    return group_sq_norms(instance, rows)


class _ScoreSolver(Solver):
    exact = False
    devices = ("cpu",)
    Params = NoParams
    refits = True  # False: the heuristic deploys W_hat masked (see module docstring)

    def scores(self, instance, params) -> np.ndarray:
        raise NotImplementedError

    def run(self, instance, params, deadline) -> Result:
        keep = select_top(instance, self.scores(instance, params))
        return Result(keep=keep, status=Status.FEASIBLE, info={"refit": self.refits})


@register
class Magnitude(_ScoreSolver):
    """Keep the groups of largest ||W_hat_g||_F; no refit (see module docstring)."""

    name = "magnitude"
    refits = False
    description = "largest group norms of W_hat, no refit (info: err_no_refit; err is the refit's)"

    def scores(self, instance, params):
        return magnitude_scores(instance)


@register
class MagnitudeRefit(_ScoreSolver):
    """Keep the groups of largest ||W_hat_g||_F, weights refit by least squares."""

    name = "magnitude-refit"
    description = "largest group norms of W_hat, optimal least-squares weights on the support"

    def scores(self, instance, params):
        return magnitude_scores(instance)


@register
class Activation(_ScoreSolver):
    """Wanda-style: keep the groups of largest sum_{i in g} H_ii ||W_hat_i||^2; no refit."""

    name = "activation"
    refits = False
    description = "Wanda-style group norms of W_hat scaled by sqrt(diag H), no refit (info: err_no_refit)"

    def scores(self, instance, params):
        return activation_scores(instance)
