"""Group iterative hard thresholding (IHT) with a final least-squares refit.

Minimizes q(W) = 0.5 tr(W'HW) - tr(G'W) over W (d x m) whose nonzero rows
lie in at most `keep` groups, by

    W <- P_k(W - grad q(W) / L),   grad q(W) = H W - G = H (W - W_hat),

with L >= lambda_max(H) (so every step decreases q: Blumensath & Davies 2009,
group version) and P_k keeping the `keep` groups of largest Frobenius norm (with
a partition: the budget[j] largest of every part j), zeroing the others. The
start is W_hat, so the first support is the magnitude support.

When the support has not changed for `patience` steps, W is replaced by the
optimal weights on the support, W_S = H_SS^-1 G_S (a refit can only lower q),
and one more step is taken from there: if it keeps the support, the support is
a fixed point of the IHT map at its own optimal weights, i.e.

    min_{g in S} ||W_g|| >= max_{h not in S} ||r_h|| / L,   r = G - H W  (zero on S),

and the solver stops (info["converged"] = True); otherwise the iteration
continues from the new support. `max_iter` bounds the number of steps.

L is estimated by power iteration as theta + ||H v - theta v|| (Rayleigh
quotient plus residual); should a step ever increase q (an underestimate), L
is doubled and the step repeated, so q is monotone whatever the estimate.

Exact column reduction: when m > d the m columns are replaced by r = d
coordinates of their row space, G = F Q' (Q'Q = I, a QR of G'); then W_hat = W_F Q'
with W_F = W_hat Q, every iterate is W_t = V_t Q' and ||W_t,g|| = ||V_t,g||, so
the iteration (and its support sequence) is unchanged while each step costs
d x d x r instead of d x d x m.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from osscar_opt.instance import Instance
from osscar_opt.osscar import Blocks, Prepared, _chol
from osscar_opt.registry import Result, Solver, Status, register

from ._common import check_dtype, prepare_tensors, select_top, sync


@dataclass
class IhtParams:
    """max_iter: cap on IHT steps (each costs one d x |S| x m product).
    patience: steps with an unchanged support before the refit and fixed-point test.
    power_iter: cap on power-iteration steps for L ~ lambda_max(H).
    dtype: working precision, "float64" (default) or "float32"."""

    max_iter: int = 300
    patience: int = 3
    power_iter: int = 100
    dtype: str = "float64"

    def __post_init__(self):
        check_dtype(self.dtype)
        for name in ("max_iter", "patience", "power_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def lipschitz(H: torch.Tensor, iters: int, seed: int = 0) -> tuple[float, float]:
    """(theta + ||Hv - theta v||, theta): power-iteration estimate of lambda_max(H), H SPD."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(H.shape[0], generator=gen, dtype=torch.float64).to(H.device, H.dtype)
    v /= torch.linalg.vector_norm(v)
    theta, residual = 0.0, math.inf
    for _ in range(iters):
        Hv = H @ v
        theta = float(v @ Hv)
        residual = float(torch.linalg.vector_norm(Hv - theta * v))
        if residual <= 1e-6 * theta:
            break
        v = Hv / torch.linalg.vector_norm(Hv)
    return theta + residual, theta


@dataclass
class _State:
    prep: Prepared
    F: torch.Tensor  # (d, r) G or its row-space coordinates
    W0: torch.Tensor  # (d, r) W_hat in the same coordinates
    blocks: Blocks  # all groups, in id order


class _Iht:
    def __init__(self, state: _State):
        self.state = state
        self.H = state.prep.H
        self.instance = state.prep.instance

    def rows(self, S: np.ndarray) -> torch.Tensor:
        """Row positions (group-contiguous layout) of the groups S, in order."""
        prep = self.state.prep
        sizes, starts = prep.sizes[S], prep.offsets[S]
        # row k of the output belongs to group S[j]: starts[j] + (k - first output row of j)
        first = np.cumsum(sizes) - sizes
        idx = np.repeat(starts - first, sizes) + np.arange(int(sizes.sum()))
        return torch.as_tensor(idx, device=prep.device)

    def project(self, V: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """(support, rows) of P_k(V): the keep groups of largest Frobenius norm."""
        sq = self.state.blocks.rows_of(V * V).sum((1, 2))
        S = select_top(self.instance, sq.double().cpu().numpy())
        return S, self.rows(S)

    def step(self, W_S: torch.Tensor, rS: torch.Tensor, L: float):
        """One IHT step from W (nonzero rows rS = W_S). Returns (V, q(W))."""
        F = self.state.F
        HW = self.H[rS].T @ W_S  # H W (W zero outside rS), H symmetric
        q = 0.5 * float((W_S * HW[rS]).sum()) - float((F[rS] * W_S).sum())
        V = (F - HW) / L  # -grad / L
        V[rS] += W_S
        return V, q

    def refit(self, rS: torch.Tensor) -> torch.Tensor:
        Lc = _chol(self.H[rS][:, rS], "H restricted to the support")
        return torch.cholesky_solve(self.state.F[rS], Lc)


@register
class Iht(Solver):
    """Group IHT with step 1/L from W_hat, refit and fixed-point test on a stable support."""

    name = "iht"
    exact = False
    devices = ("cpu", "cuda")
    Params = IhtParams
    description = "group iterative hard thresholding, step 1/lambda_max(H), refit on the support (torch, CPU/CUDA)"

    def prepare(self, instance: Instance, params: IhtParams, device: str) -> _State:
        prep = prepare_tensors(instance, device, params.dtype)
        G = prep.H @ prep.W
        W0 = prep.W
        if instance.m > instance.d:  # exact reduction to the row space (module docstring)
            Q, R = torch.linalg.qr(G.T, mode="reduced")  # G' = Q R, G = R' Q'
            G, W0 = R.T.contiguous(), prep.W @ Q
        return _State(prep, G, W0, Blocks(prep.sizes, prep.device))

    def run(self, state: _State, params: IhtParams, deadline) -> Result:
        inst = state.prep.instance
        if inst.keep in (0, inst.n_groups):
            return Result(keep=np.arange(inst.keep), info={"iterations": 0, "converged": True})
        it = _Iht(state)
        L, theta = lipschitz(it.H, params.power_iter)
        S, rS = it.project(state.W0)
        W_S = state.W0[rS]
        info = {"lipschitz": L, "lambda_max_estimate": theta, "iterations": 0, "refits": 0,
                "converged": False, "step_doublings": 0}
        tol = 1e-12 * abs(inst.full_objective) if state.prep.dtype == torch.float64 else 1e-6 * abs(inst.full_objective)
        stable = 0
        prev = None  # (S, rows, W_S, q) of the previous iterate
        while info["iterations"] < params.max_iter:
            if deadline is not None and time.perf_counter() > deadline:
                break
            refitted = stable >= params.patience
            if refitted:
                W_S = it.refit(rS)
                info["refits"] += 1
            V, q = it.step(W_S, rS, L)  # q = q(current W)
            if prev is not None and not refitted and q > prev[3] + tol:
                # the last step increased q: L underestimates lambda_max; redo it with 2L
                L *= 2.0
                info["step_doublings"] += 1
                S, rS, W_S = prev[0], prev[1], prev[2]
                V, q = it.step(W_S, rS, L)
            prev = (S, rS, W_S, q)
            S_new, rS_new = it.project(V)
            info["iterations"] += 1
            if np.array_equal(S_new, S):
                if refitted:
                    info["converged"] = True
                    break
                stable += 1
            else:
                stable = 0
            S, rS, W_S = S_new, rS_new, V[rS_new]
        info["lipschitz"] = L
        sync(state.prep.device)
        status = Status.FEASIBLE
        if deadline is not None and time.perf_counter() > deadline and not info["converged"]:
            status = Status.TIME_LIMIT
        return Result(keep=S, status=status, info=info)
