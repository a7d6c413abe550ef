"""One-group-at-a-time greedy baselines: OBS backward elimination and forward selection.

Both are the same symmetric block elimination on a pair of matrices (A, B)
over the rows still in play, scored per group g by

    s_g = 0.5 tr(A_gg^-1 B_gg)

and, when the group with rows R is eliminated, updated by the exact block
Gaussian-elimination step (C C' = A_RR a Cholesky factorization)

    u = A[:, R] C^-T,  y = B[:, R] C^-T,  M = C^-1 B_RR C^-T
    A <- A - u u'
    B <- B - u y' - y u' + u M u'

* obs-greedy (ZipLM-style, Kurtic et al. 2023): A = H^-1, B = W_hat W_hat'.
  s_g = 0.5 tr(W_g' [Hinv_gg]^-1 W_g) is the exact OBS increase of f when g is
  removed and the remaining weights are re-optimized; the update is the block
  Woodbury downdate of the inverse and the OBS weight update
  W <- W - Hinv[:, R] Hinv_RR^-1 W_R, expressed on B = W W'. Removes the
  cheapest group, p - keep times.
* forward: A = H, B = G G'. With S the groups chosen so far, A is the Schur
  complement Sigma = H - H_:S H_SS^-1 H_S: and B = r r' with the residual
  gradient r = G - H_:S H_SS^-1 G_S, so s_h = 0.5 tr(r_h' Sigma_hh^-1 r_h) is
  the exact decrease of f when h is added. Adds the best group, keep times.

The updates are applied lazily (SparseGPT-style): A and B are kept as a dense
matrix from the start of a block of steps minus the low-rank factors U, V of
the block (A - U U', B - U V' - V U' with V = y - 0.5 u M), so a step touches
only the eliminated group's columns and the (n, b, b) diagonal blocks of all
groups (one batched update, no loop over groups); at the end of the block the
factors are applied with two GEMMs and the eliminated rows are dropped.

Neither solver checks the time limit: each runs its p - keep (or keep) steps
to completion, well under a second at p = 1536 on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from osscar_opt.errors import SolverError
from osscar_opt.instance import Instance
from osscar_opt.osscar import Blocks, Prepared, _chol
from osscar_opt.registry import Result, Solver, Status, register

from ._common import check_dtype, prepare_tensors, sync


@dataclass
class EliminationParams:
    """dtype: working precision, "float64" (default) or "float32" (the reported
    objective is always re-evaluated in fp64).
    lazy_rank: rows eliminated between two dense updates of A and B (the rank
    of the lazy low-rank factors); a tuning knob, the result does not depend
    on it beyond round-off."""

    dtype: str = "float64"
    lazy_rank: int = 128

    def __post_init__(self):
        check_dtype(self.dtype)
        if isinstance(self.lazy_rank, bool) or int(self.lazy_rank) < 1:
            raise ValueError(f"lazy_rank must be a positive integer, got {self.lazy_rank!r}")


_LOST_PD = (
    "the pivot block of the eliminated group is not positive definite (round-off): "
    "use dtype='float64' or build the instance with more damping"
)


def _trace_scores(blocks: Blocks, DA: torch.Tensor, DB: torch.Tensor) -> torch.Tensor:
    """0.5 tr(DA_g^-1 DB_g) for every group; DA (n, b, b) SPD, DB (n, b, b)."""
    if blocks.b == 1:
        return 0.5 * DB.view(-1) / DA.view(-1)
    L, info = torch.linalg.cholesky_ex(DA)
    if bool((info != 0).any()):
        raise SolverError("a diagonal block lost positive definiteness: use dtype='float64' or more damping")
    return 0.5 * torch.cholesky_solve(DB, L).diagonal(dim1=-2, dim2=-1).sum(-1)


def _rows_at(blocks: Blocks, pos: torch.Tensor) -> torch.Tensor:
    """Row positions (in the current layout) of the groups at positions `pos`."""
    rows = blocks.idx[pos]
    if blocks.mask is not None:
        rows = rows[blocks.mask[pos]]
    return rows.reshape(-1)


def eliminate(
    A: torch.Tensor,
    B: torch.Tensor,
    sizes: np.ndarray,
    steps: int,
    largest: bool,
    parts: np.ndarray | None = None,
    caps: np.ndarray | None = None,
    lazy_rank: int = 128,
) -> np.ndarray:
    """Eliminate `steps` groups one at a time; returns their ids in elimination order.

    A, B: (rows x rows) symmetric, the groups laid out contiguously in id order
    with `sizes[g]` rows each; they are consumed. At every step the eligible
    group of smallest (largest=False) or largest (largest=True) score
    s_g = 0.5 tr(A_gg^-1 B_gg) is eliminated (ties: lowest id) and A, B are
    updated as in the module docstring. With `parts`, at most caps[j] groups of
    part j are eliminated.
    """
    device = A.device
    p = int(sizes.size)
    active = np.arange(p)  # group ids at the positions of the current layout
    order: list[int] = []
    caps = None if caps is None else np.array(caps, dtype=np.int64)
    step = _scalar_steps if np.all(sizes == 1) else _block_steps
    while len(order) < steps:
        eligible = torch.ones(active.size, dtype=torch.bool, device=device)
        if caps is not None:
            eligible &= torch.as_tensor(caps[parts[active]] > 0, device=device)
        blocks = Blocks(sizes[active], device)
        done, cols, U, V = step(A, B, blocks, eligible, active, order, steps, largest, parts, caps, int(lazy_rank))
        if len(order) == steps:
            break
        # apply the block's low-rank factors and drop the eliminated rows
        keep = _rows_at(blocks, torch.as_tensor(np.flatnonzero(~done), device=device))
        Uk, Vk = U[keep, :cols], V[keep, :cols]
        A = torch.addmm(A[keep][:, keep], Uk, Uk.T, alpha=-1.0)
        B = torch.addmm(B[keep][:, keep], torch.cat([Uk, Vk], 1), torch.cat([Vk, Uk], 1).T, alpha=-1.0)
        active = active[~done]
    return np.asarray(order, dtype=np.int64)


def _pick(s: torch.Tensor, eligible: torch.Tensor, largest: bool) -> int:
    if largest:
        pos = int(torch.argmax(s.masked_fill(~eligible, -math.inf)))
    else:
        pos = int(torch.argmin(s.masked_fill(~eligible, math.inf)))
    if not bool(eligible[pos]):
        raise SolverError("no eligible group left to eliminate: the partition budgets are inconsistent")
    return pos


def _account(pos, active, order, eligible, parts, caps) -> None:
    """Record the elimination of the group at `pos`; close its part when its cap is used up."""
    eligible[pos] = False
    g = int(active[pos])
    order.append(g)
    if caps is not None:
        caps[parts[g]] -= 1
        if caps[parts[g]] == 0:
            eligible &= torch.as_tensor(parts[active] != parts[g], device=eligible.device)


def _scalar_steps(A, B, blocks, eligible, active, order, steps, largest, parts, caps, lazy_rank):
    """Steps of `eliminate` when every group is one row (scalar pivots, no batched blocks).

    Returns (done mask, columns used, U, V) with A_cur = A - U U', B_cur = B - U V' - V U'.
    """
    n = blocks.n
    DA = A.diagonal().clone()
    DB = B.diagonal().clone()
    UT = torch.zeros(lazy_rank, n, dtype=A.dtype, device=A.device)  # U', rows contiguous
    VT = torch.zeros_like(UT)
    done = np.zeros(n, dtype=bool)
    cols = 0
    while len(order) < steps and cols < lazy_rank:
        pos = _pick(DB / DA, eligible, largest)
        Ut, Vt = UT[:cols], VT[:cols]
        Up, Vp = Ut[:, pos], Vt[:, pos]
        a = A[pos] - Up @ Ut  # A_cur[:, pos] (A symmetric)
        bc = B[pos] - Vp @ Ut - Up @ Vt
        piv = float(a[pos])
        if not piv > 0:
            raise SolverError(_LOST_PD)
        scale = 1.0 / math.sqrt(piv)
        u = a * scale
        v = bc * scale
        v -= (0.5 * float(bc[pos]) / piv) * u  # y - 0.5 u M with M = B_RR / A_RR
        UT[cols] = u
        VT[cols] = v
        cols += 1
        DA -= u * u
        DB -= 2.0 * u * v
        DA[pos] = 1.0  # eliminated: neutral entries
        DB[pos] = 0.0
        done[pos] = True
        _account(pos, active, order, eligible, parts, caps)
    return done, cols, UT.T, VT.T


def _block_steps(A, B, blocks, eligible, active, order, steps, largest, parts, caps, lazy_rank):
    """Steps of `eliminate` for groups of several rows: batched (n, b, b) diagonal blocks."""
    device, dtype = A.device, A.dtype
    n, b = blocks.n, blocks.b
    DA = blocks.diag(A).clone()  # identity on padding (Blocks.diag)
    DB = blocks.diag(B).clone()
    if blocks.mask is not None:
        DB = DB * (blocks.mask[:, :, None] & blocks.mask[:, None, :])  # zero on padding
    max_cols = max(lazy_rank, b)
    U = torch.zeros(A.shape[0], max_cols, dtype=dtype, device=device)
    V = torch.zeros_like(U)
    done = np.zeros(n, dtype=bool)
    cols = 0
    eye = torch.eye(b, dtype=dtype, device=device)
    while len(order) < steps and cols + b <= max_cols:
        pos = _pick(_trace_scores(blocks, DA, DB), eligible, largest)
        R = _rows_at(blocks, torch.tensor([pos], device=device))
        nr = R.numel()
        Uc, Vc = U[:, :cols], V[:, :cols]
        UR, VR = Uc[R], Vc[R]
        a = A[R].T - Uc @ UR.T  # A_cur[:, R]
        bc = B[R].T - Uc @ VR.T - Vc @ UR.T
        C, info = torch.linalg.cholesky_ex(a[R])
        if int(info) != 0:
            raise SolverError(_LOST_PD)
        u = torch.linalg.solve_triangular(C, a.T, upper=False).T  # a C^-T
        y = torch.linalg.solve_triangular(C, bc.T, upper=False).T  # bc C^-T
        M = torch.linalg.solve_triangular(C, y[R], upper=False)  # C^-1 B_RR C^-T
        v = y - 0.5 * (u @ M)
        U[:, cols : cols + nr] = u
        V[:, cols : cols + nr] = v
        cols += nr
        ug, vg = blocks.rows_of(u), blocks.rows_of(v)  # (n, b, nr)
        DA -= ug @ ug.transpose(1, 2)
        uv = ug @ vg.transpose(1, 2)
        DB -= uv + uv.transpose(1, 2)
        DA[pos] = eye  # eliminated: neutral blocks
        DB[pos] = 0.0
        done[pos] = True
        _account(pos, active, order, eligible, parts, caps)
    return done, cols, U, V


def _partition(prep: Prepared):
    return (None, None) if prep.parts is None else (prep.parts, prep.budget)


class _EliminationSolver(Solver):
    exact = False
    devices = ("cpu", "cuda")
    Params = EliminationParams

    def prepare(self, instance: Instance, params: EliminationParams, device: str) -> Prepared:
        return prepare_tensors(instance, device, params.dtype)


@register
class ObsGreedy(_EliminationSolver):
    """Backward elimination, one group per step, exact OBS cost and update (ZipLM-style)."""

    name = "obs-greedy"
    description = "remove the group of least exact OBS cost one at a time, Woodbury update (torch, CPU/CUDA)"

    def run(self, prep: Prepared, params: EliminationParams, deadline) -> Result:
        inst = prep.instance
        p, keep = inst.n_groups, inst.keep
        if keep == p:
            return Result(keep=np.arange(p), info={"removed": []})
        parts, budget = _partition(prep)
        caps = None if parts is None else np.bincount(parts, minlength=budget.size) - budget
        if keep == 0:
            return Result(keep=np.arange(0), info={"removed": list(range(p))})
        Hinv = torch.cholesky_inverse(_chol(prep.H, "H"))
        WWt = prep.W @ prep.W.T
        removed = eliminate(Hinv, WWt, prep.sizes, p - keep, False, parts, caps, params.lazy_rank)
        sync(prep.device)
        support = np.setdiff1d(np.arange(p), removed)
        return Result(keep=support, status=Status.FEASIBLE, info={"removed": removed.tolist()})


@register
class Forward(_EliminationSolver):
    """Forward selection: add the group of largest exact gain 0.5 tr(r_h' Sigma_h^-1 r_h)."""

    name = "forward"
    description = "add the group of largest exact objective decrease one at a time (torch, CPU/CUDA)"

    def run(self, prep: Prepared, params: EliminationParams, deadline) -> Result:
        inst = prep.instance
        if inst.keep == 0:
            return Result(keep=np.arange(0), info={"added": []})
        parts, budget = _partition(prep)
        G = prep.H @ prep.W
        added = eliminate(prep.H.clone(), G @ G.T, prep.sizes, inst.keep, True, parts, budget, params.lazy_rank)
        sync(prep.device)
        return Result(keep=np.sort(added), status=Status.FEASIBLE, info={"added": added.tolist()})
