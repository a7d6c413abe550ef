"""OSSCAR: multi-stage greedy backward elimination plus swap local search.

Meng, Ibrahim, Behdin, Hazimeh, Ponomareva, Mazumder, "OSSCAR: One-Shot
Structured Pruning in Vision and Language Models with Combinatorial
Optimization", ICML 2024 (arXiv 2403.12983), sections 3 and 4.

Notation (DESIGN.md section 1): S the kept groups, Hinv = (H_SS)^-1,
W_S = Hinv G_S the optimal weights on S.

* Removing a group g from S costs (OBS)       c_g = 0.5 tr(W_g' [Hinv_gg]^-1 W_g)
  and the weights/inverse follow by a block Woodbury step on the active set.
* Adding a group h outside S gains             a_h = 0.5 tr(r_h' Sigma_h^-1 r_h)
  with the residual gradient r_h = G_h - H_hS W_S and the Schur complement
  Sigma_h = H_hh - H_hS Hinv H_Sh.
* A swap (g out, h in) changes f by exactly    c_g - 0.5 tr(r'_h' Sigma'_h^-1 r'_h)
  where, with V = (H_NS Hinv)_{h,g} and P = [Hinv_gg]^-1,
  r'_h = r_h + V P W_g and Sigma'_h = Sigma_h + V P V', so every pair is
  scored exactly from a handful of matrix products.

Unlike the published code this implementation detects pruned groups by the
support itself (never by weight sums), never asks for more swaps than there
are groups, uses Cholesky factorizations instead of explicit inverses of H,
works on the shrinking active set, and vectorizes over groups.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import SolverError
from .instance import Instance
from .linalg import batched_objectives, output_factor
from .registry import Result, Solver, Status, register

DTYPES = {"float64": torch.float64, "float32": torch.float32}
_DTYPES = DTYPES


@dataclass
class OsscarParams:
    """Parameters of the OSSCAR solver.

    remove_per_stage: groups removed together per greedy stage; None chooses
        ceil(stage_fraction * groups still to remove) at every stage.
    stage_fraction: fraction of the remaining removals done per stage.
    local_search: run the swap local search after the greedy.
    swap_size: initial number of groups swapped at once (halved on failure);
        None chooses about 1/16 of min(keep, p - keep) for multi-row groups
        and skips the multi-swap phase for single-row groups.
    max_iter: cap on local-search steps (tried multi-swaps plus single swaps).
    refresh_every: single-row groups update the swap quantities by rank-one
        steps; they are refactorized after this many swaps.
    swaps_per_scan: single-row groups apply up to this many of the best swaps
        found by one scan of all pairs (on distinct groups, each re-scored
        exactly after the previous ones, kept only if it still improves).
    pair_swap_limit: when a single swap no longer improves, every exchange of
        two groups for two others is evaluated exactly if there are at most
        this many (0 disables); catches local optima of small instances.
    dtype: "float64" (default) or "float32" for the working precision; the
        reported objective is always re-evaluated in fp64.
    low_memory: H leaves the device while the greedy forms and uses H^-1 and
        comes back (one host-to-device copy, timed with the greedy) for the
        local search: the device then never holds H, its Cholesky factor and
        H^-1 at once (about 3.3 instead of 4.3 d x d matrices at the peak).
    """

    remove_per_stage: int | None = None
    stage_fraction: float = 0.25
    local_search: bool = True
    swap_size: int | None = None
    max_iter: int = 1000
    pair_swap_limit: int = 50_000
    refresh_every: int = 64
    swaps_per_scan: int = 8
    dtype: str = "float64"
    low_memory: bool = False

    def __post_init__(self):
        if self.remove_per_stage is not None and int(self.remove_per_stage) < 1:
            raise ValueError("remove_per_stage must be a positive integer or None")
        if not 0.0 < float(self.stage_fraction) <= 1.0:
            raise ValueError("stage_fraction must lie in (0, 1]")
        if self.swap_size is not None and int(self.swap_size) < 1:
            raise ValueError("swap_size must be a positive integer or None")
        if int(self.swaps_per_scan) < 1:
            raise ValueError("swaps_per_scan must be >= 1")
        if int(self.refresh_every) < 1:
            raise ValueError("refresh_every must be >= 1")
        if int(self.pair_swap_limit) < 0:
            raise ValueError("pair_swap_limit must be >= 0")
        if int(self.max_iter) < 0:
            raise ValueError("max_iter must be >= 0")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}")


# ---------------------------------------------------------------- group blocks
class Blocks:
    """Row positions of a list of groups laid out contiguously in that order.

    `idx` is (n, b) with b the largest group size; `mask` is None when every
    group has b rows, else a boolean (n, b) marking real rows (padding points
    at row 0 and is neutralized by the callers).
    """

    def __init__(self, sizes: np.ndarray, device: torch.device):
        sizes = np.asarray(sizes, dtype=np.int64)
        self.n = int(sizes.size)
        self.b = int(sizes.max(initial=1))
        self.rows = int(sizes.sum())
        if self.n and np.all(sizes == self.b):
            self.idx = torch.arange(self.rows, device=device).view(self.n, self.b)
            self.mask = None
        else:
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            offs = np.arange(self.b)[None, :]
            mask = offs < sizes[:, None]
            idx = np.where(mask, starts[:, None] + offs, 0)
            self.idx = torch.as_tensor(idx, device=device)
            self.mask = torch.as_tensor(mask, device=device)

    def diag(self, M: torch.Tensor) -> torch.Tensor:
        """(n, b, b) diagonal blocks of M; padding gets an identity block."""
        if self.b == 1:  # every group is a single row
            return M.diagonal()[self.idx.view(-1)].view(self.n, 1, 1)
        if self.mask is None:
            # contiguous equal blocks: a strided view of the block diagonal
            n, b = self.n, self.b
            return M.view(n, b, n, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        blocks = M[self.idx[:, :, None], self.idx[:, None, :]]
        m2 = self.mask[:, :, None] & self.mask[:, None, :]
        eye = torch.eye(self.b, dtype=M.dtype, device=M.device).expand_as(blocks)
        return torch.where(m2, blocks, eye)

    def rows_of(self, X: torch.Tensor) -> torch.Tensor:
        """(n, b, ...) rows of X grouped; padding rows are zero."""
        if self.mask is None:
            return X.reshape(self.n, self.b, *X.shape[1:])
        out = X[self.idx]
        return out * self.mask.view(self.n, self.b, *([1] * (X.dim() - 1)))

    def cols_of(self, X: torch.Tensor) -> torch.Tensor:
        """(..., n, b) columns of X grouped; padding columns are zero."""
        if self.mask is None:
            return X.reshape(*X.shape[:-1], self.n, self.b)
        out = X[..., self.idx]
        return out * self.mask


def _quad_costs(blocks: Blocks, Binv_diag: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """0.5 tr(Y_g' [B_g]^-1 Y_g) for every group g; B_g are (n, b, b) SPD blocks."""
    if blocks.b == 1 and blocks.mask is None:
        return 0.5 * (Y * Y).sum(1) / Binv_diag.view(-1)
    Yg = blocks.rows_of(Y)  # (n, b, m)
    L, info = torch.linalg.cholesky_ex(Binv_diag)
    if bool((info != 0).any()):
        raise SolverError("a diagonal block lost positive definiteness: use dtype='float64' or more damping")
    Z = torch.linalg.solve_triangular(L, Yg, upper=False)
    return 0.5 * (Z * Z).sum((1, 2))


def _take_lowest(scores: np.ndarray, parts: np.ndarray | None, caps: np.ndarray | None, count: int) -> np.ndarray:
    """Positions of the `count` lowest scores, at most caps[j] from part j."""
    order = np.argsort(scores, kind="stable")
    if parts is None:
        return order[:count]
    p_sorted = parts[order]
    # rank of each entry among earlier entries of the same part
    o2 = np.argsort(p_sorted, kind="stable")
    ranks = np.empty_like(o2)
    counts = np.bincount(p_sorted, minlength=caps.size)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks[o2] = np.arange(o2.size) - np.repeat(starts, counts)
    allowed = ranks < caps[p_sorted]
    return order[allowed][:count]


# ------------------------------------------------------------------- the state
@dataclass
class Prepared:
    instance: Instance
    H: torch.Tensor  # rows/cols permuted so groups are contiguous, on device
    W: torch.Tensor
    sizes: np.ndarray  # rows per group (group order)
    offsets: np.ndarray  # first permuted row of each group
    parts: np.ndarray | None
    budget: np.ndarray | None
    device: torch.device
    dtype: torch.dtype


def _rows(prep: Prepared, groups: np.ndarray) -> torch.Tensor:
    """Permuted row positions of `groups`, in the order given."""
    sizes = prep.sizes[groups]
    if sizes.size == 0:
        return torch.zeros(0, dtype=torch.long, device=prep.device)
    starts = prep.offsets[groups]
    if np.all(sizes == sizes[0]):
        idx = (starts[:, None] + np.arange(sizes[0])[None, :]).ravel()
    else:
        idx = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, sizes)])
    return torch.as_tensor(idx, device=prep.device)


def _sub(M: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """M[rows][:, cols] in one gather (no |rows| x d intermediate)."""
    return M[rows[:, None], cols[None, :]]


def _chol(M: torch.Tensor, what: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        raise SolverError(
            f"Cholesky of {what} failed (matrix not positive definite in this precision): "
            "use dtype='float64' or build the instance with more damping"
        )
    return L


# -------------------------------------------------------------------- greedy
def _stage_size(params: OsscarParams, remaining: int) -> int:
    if params.remove_per_stage is not None:
        return min(int(params.remove_per_stage), remaining)
    return min(remaining, max(1, math.ceil(params.stage_fraction * remaining)))


def greedy(prep: Prepared, params: OsscarParams) -> np.ndarray:
    """Multi-stage backward elimination down to `keep` groups; returns them.

    The inverse of H on the active set A is kept implicitly as
    Hinv_A = (H^-1)_AA - U_A U_A', one column block of U per stage, so a stage
    touches only the columns of the groups it removes and the diagonal blocks
    the scores need (section 3 of the paper, done lazily): removing R adds
    U_new = Hinv_AR L^-T with L L' = Hinv_RR, and the weights follow by
    W_A -= U_new L^-1 W_R, the exact least-squares refit on A minus R.
    """
    inst = prep.instance
    p, keep = inst.n_groups, inst.keep
    active = np.arange(p)
    if keep == p:
        return active
    if keep == 0:
        return active[:0]
    caps = None
    if prep.parts is not None:
        caps = np.bincount(prep.parts, minlength=prep.budget.size) - prep.budget
    dev = prep.device
    L = _chol(prep.H, "H")
    if params.low_memory:
        prep.H = None  # back for the local search (see `_restore_H`)
    Hinv0 = torch.cholesky_inverse(L)
    del L
    rows_A = _rows(prep, active)
    blocks = Blocks(prep.sizes[active], dev)
    diag_A = blocks.diag(Hinv0).clone()  # diagonal blocks of the current inverse, per active group
    W_A = prep.W.clone()  # exact weights on the active rows (W_hat when nothing is removed)
    U_A = torch.zeros(rows_A.numel(), 0, dtype=prep.dtype, device=dev)
    remaining = p - keep
    while remaining > 0:
        costs = _quad_costs(blocks, diag_A, W_A).cpu().numpy()
        parts = None if prep.parts is None else prep.parts[active]
        pos = _take_lowest(costs, parts, caps, _stage_size(params, remaining))
        if caps is not None:
            np.subtract.at(caps, parts[pos], 1)
        out_mask = np.zeros(active.size, dtype=bool)
        out_mask[pos] = True
        keep_pos = np.flatnonzero(~out_mask)
        r_out = _positions(blocks, pos, dev)  # positions of the removed rows inside A
        r_keep = _positions(blocks, keep_pos, dev)
        H_AR = Hinv0[rows_A[:, None], rows_A[r_out][None, :]]
        if U_A.shape[1]:
            H_AR = H_AR - U_A @ U_A[r_out].T
        L = _chol(H_AR[r_out], "the removed block of H^-1")
        U_new = torch.linalg.solve_triangular(L, H_AR.T, upper=False).T  # Hinv_AR L^-T
        Z = torch.linalg.solve_triangular(L, W_A[r_out], upper=False)  # L^-1 W_R
        U_new = U_new[r_keep]
        W_A = W_A[r_keep] - U_new @ Z
        U_A = torch.cat([U_A[r_keep], U_new], dim=1)
        active = active[keep_pos]
        rows_A = rows_A[r_keep]
        new_blocks = Blocks(prep.sizes[active], dev)
        Ug = new_blocks.rows_of(U_new)  # (n, b, |R|)
        diag_A = diag_A[torch.as_tensor(keep_pos, device=dev)] - Ug @ Ug.transpose(1, 2)
        if new_blocks.mask is not None:
            eye = torch.eye(new_blocks.b, dtype=diag_A.dtype, device=dev)
            pad = ~(new_blocks.mask[:, :, None] & new_blocks.mask[:, None, :])
            diag_A = torch.where(pad, eye.expand_as(diag_A), diag_A)
        blocks = new_blocks
        remaining -= pos.size
    return np.sort(active)


def _device_H(instance: Instance, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """H on `device` in `dtype`, rows and columns permuted so groups are contiguous."""
    if instance.group_size is not None:
        return torch.as_tensor(instance.H, device=device, dtype=dtype)
    order = np.argsort(instance.groups, kind="stable")
    return torch.as_tensor(instance.H[np.ix_(order, order)], device=device, dtype=dtype)


def _restore_H(prep: Prepared) -> None:
    if prep.H is None:
        prep.H = _device_H(prep.instance, prep.device, prep.dtype)


def _positions(blocks: Blocks, group_pos: np.ndarray, device: torch.device) -> torch.Tensor:
    """Row positions (inside the blocks' layout) of the groups at `group_pos`."""
    sel = blocks.idx[torch.as_tensor(group_pos, device=device)]
    if blocks.mask is not None:
        sel = sel[blocks.mask[torch.as_tensor(group_pos, device=device)]]
    return sel.reshape(-1)


# --------------------------------------------------------------- local search
class _Support:
    """Everything the swap moves need about the current support S."""

    def __init__(self, prep: Prepared, G: torch.Tensor, S: np.ndarray):
        self.S = np.sort(S)
        p = prep.instance.n_groups
        in_S = np.zeros(p, dtype=bool)
        in_S[self.S] = True
        self.N = np.flatnonzero(~in_S)
        rS, rN = _rows(prep, self.S), _rows(prep, self.N)
        H = prep.H
        L = _chol(_sub(H, rS, rS), "H restricted to the support")
        self.Hinv = torch.cholesky_inverse(L)
        G_S = G[rS]
        self.W_S = torch.cholesky_solve(G_S, L)
        self.objective = -0.5 * float((G_S * self.W_S).sum())
        self.bS = Blocks(prep.sizes[self.S], prep.device)
        self.bN = Blocks(prep.sizes[self.N], prep.device)
        Pinv_diag = self.bS.diag(self.Hinv)
        self.Hinv_diag = Pinv_diag
        self.cost = _quad_costs(self.bS, Pinv_diag, self.W_S)  # removal cost per g in S
        if self.N.size == 0:
            return
        H_NS = _sub(H, rN, rS)
        self.C = H_NS @ self.Hinv  # (|N| rows, |S| rows)
        self.R = G[rN] - H_NS @ self.W_S  # residual gradient
        if self.bN.b == 1 and self.bN.mask is None:
            self.Sigma = (H.diagonal()[rN] - (self.C * H_NS).sum(1)).view(-1, 1, 1)
        else:
            Cg = self.bN.rows_of(self.C)  # (nN, b, |S|)
            HgS = self.bN.rows_of(H_NS)
            self.Sigma = self.bN.diag(_sub(H, rN, rN)) - Cg @ HgS.transpose(1, 2)
            if self.bN.mask is not None:  # identity on padding
                eye = torch.eye(self.bN.b, dtype=H.dtype, device=H.device)
                pad = ~(self.bN.mask[:, :, None] & self.bN.mask[:, None, :])
                self.Sigma = torch.where(pad, eye.expand_as(self.Sigma), self.Sigma)
        self.gain = _quad_costs(self.bN, self.Sigma, self.R)  # add-back gain per h in N

    def swap_deltas(self, prep: Prepared) -> torch.Tensor:
        """(|N|, |S|) exact change of f for swapping g in S out and h in N in."""
        if self.bS.b == 1 and self.bN.b == 1 and self.bS.mask is None and self.bN.mask is None:
            V = self.C
            P = 1.0 / self.Hinv.diagonal()
            D = self.R @ self.W_S.T
            w2 = (self.W_S * self.W_S).sum(1)
            r2 = (self.R * self.R).sum(1)
            VP = V * P
            num = r2[:, None] + 2.0 * VP * D + VP * VP * w2
            den = self.Sigma.view(-1, 1) + VP * V
            delta = self.cost[None, :] - 0.5 * num / den
        else:
            delta = self._block_deltas()
        if prep.parts is not None:
            same = prep.parts[self.N][:, None] == prep.parts[self.S][None, :]
            delta = torch.where(torch.as_tensor(same, device=delta.device), delta, torch.full_like(delta, math.inf))
        return delta

    def _block_deltas(self, chunk_bytes: int = 1 << 28) -> torch.Tensor:
        bS, bN = self.bS, self.bN
        nS, nN = bS.n, bN.n
        P = torch.cholesky_inverse(torch.linalg.cholesky(self.Hinv_diag))  # (nS, b, b) = [Hinv_gg]^-1
        if bS.mask is not None:
            P = P * (bS.mask[:, :, None] & bS.mask[:, None, :])
        Wg = bS.rows_of(self.W_S)  # (nS, bs, m)
        Q = P @ Wg  # (nS, bs, m)
        Kgg = Q @ Q.transpose(1, 2)  # (nS, bs, bs)
        Rh = bN.rows_of(self.R)  # (nN, bn, m)
        Khh = Rh @ Rh.transpose(1, 2)  # (nN, bn, bn)
        Qflat = Q.reshape(nS * bS.b, -1)
        Khg = bN.rows_of(self.R @ Qflat.T)  # (nN, bn, nS*bs)
        Khg = Khg.view(nN, bN.b, nS, bS.b).permute(0, 2, 1, 3)  # (nN, nS, bn, bs)
        V = bS.cols_of(bN.rows_of(self.C))  # (nN, bn, nS, bs)
        V = V.permute(0, 2, 1, 3)  # (nN, nS, bn, bs)
        out = torch.empty(nN, nS, dtype=self.C.dtype, device=self.C.device)
        per_h = max(1, nS * bN.b * bN.b * 8 * 6)
        step = max(1, chunk_bytes // per_h)
        for a in range(0, nN, step):
            Vc = V[a : a + step]
            VP = Vc @ P  # (c, nS, bn, bs)
            Sig = self.Sigma[a : a + step, None] + VP @ Vc.transpose(-1, -2)
            # r'r'^T with r' = r_h + V Q_g, Q_g = P_g W_g
            KV = Khg[a : a + step] @ Vc.transpose(-1, -2)
            M = Khh[a : a + step, None] + KV + KV.transpose(-1, -2) + Vc @ Kgg @ Vc.transpose(-1, -2)
            L, info = torch.linalg.cholesky_ex(Sig)
            if bool((info != 0).any()):
                raise SolverError("a swap Schur complement is not positive definite: use dtype='float64'")
            Z = torch.cholesky_solve(M, L)
            out[a : a + step] = 0.5 * Z.diagonal(dim1=-2, dim2=-1).sum(-1)
        return self.cost[None, :] - out


class _ScalarSwaps:
    """The single-swap neighbourhood for single-row groups, kept up to date by
    rank-one updates: an accepted swap costs O((|N| + |S|)(|S| + m)) instead
    of a new factorization. Positions are stable: the group swapped in takes
    the place of the one swapped out, and vice versa.

    Kept per position: Hinv = H_SS^-1, W = H_SS^-1 G_S, C = H_NS Hinv,
    R = G_N - H_NS W (residual gradients), Sigma (Schur complements of N)
    and D = R W' (the pair products of `swap_deltas`).
    """

    def __init__(self, prep: Prepared, G: torch.Tensor, S: np.ndarray):
        self.prep, self.G = prep, G
        self.Hdiag = prep.H.diagonal()
        self.reset(S)

    def reset(self, S: np.ndarray) -> None:
        prep, G, H = self.prep, self.G, self.prep.H
        self.S = np.sort(np.asarray(S))
        in_S = np.zeros(prep.instance.n_groups, dtype=bool)
        in_S[self.S] = True
        self.N = np.flatnonzero(~in_S)
        self.rS = torch.as_tensor(self.S, device=prep.device)
        self.rN = torch.as_tensor(self.N, device=prep.device)
        L = _chol(_sub(H, self.rS, self.rS), "H restricted to the support")
        self.Hinv = torch.cholesky_inverse(L)
        G_S = G[self.rS]
        self.W = torch.cholesky_solve(G_S, L)
        self.objective = -0.5 * float((G_S * self.W).sum())
        H_NS = _sub(H, self.rN, self.rS)
        self.C = H_NS @ self.Hinv
        self.R = G[self.rN] - H_NS @ self.W
        self.Sigma = self.Hdiag[self.rN] - (self.C * H_NS).sum(1)
        self.D = self.R @ self.W.T
        if prep.parts is not None:
            self.partS = torch.as_tensor(prep.parts[self.S], device=prep.device)
            self.partN = torch.as_tensor(prep.parts[self.N], device=prep.device)

    def swap_deltas(self, prep: Prepared, rows: slice = slice(None)) -> torch.Tensor:
        """Exact change of f for every (h in N[rows], g in S) swap."""
        a = self.Hinv.diagonal()
        w2 = (self.W * self.W).sum(1)
        R, C, D = self.R[rows], self.C[rows], self.D[rows]
        r2 = (R * R).sum(1)
        q = C / a  # V P of the module docstring, per pair
        num = torch.addcmul(D, q, w2, value=0.5).mul_(q).mul_(2.0).add_(r2[:, None])  # r2 + 2qD + q^2 w2
        num.div_(torch.addcmul(self.Sigma[rows, None], q, C))
        delta = num.mul_(-0.5).add_(0.5 * w2 / a)
        if prep.parts is not None:
            delta = torch.where(self.partN[rows, None] == self.partS[None, :], delta, torch.full_like(delta, math.inf))
        return delta

    def best_swaps(self, prep: Prepared, count: int, chunk_bytes: int = 1 << 28) -> tuple[torch.Tensor, torch.Tensor]:
        """The `count` smallest swap deltas and their flat (h * |S| + g) indices,
        computed over row blocks so the temporaries stay within chunk_bytes."""
        n, k = self.C.shape
        step = max(1, chunk_bytes // (32 * max(k, 1)))
        vals, idxs = [], []
        for a in range(0, n, step):
            block = self.swap_deltas(prep, slice(a, a + step))
            v, i = torch.topk(block.reshape(-1), min(count, block.numel()), largest=False)
            vals.append(v)
            idxs.append(i + a * k)
        v, i = torch.cat(vals), torch.cat(idxs)
        order = torch.topk(v, min(count, v.numel()), largest=False).indices
        return v[order], i[order]

    def pair_delta(self, hi: int, gi: int) -> float:
        """The entry (hi, gi) of `swap_deltas`, in O(m)."""
        a = self.Hinv[gi, gi]
        w2 = self.W[gi] @ self.W[gi]
        r2 = self.R[hi] @ self.R[hi]
        q = self.C[hi, gi] / a
        num = r2 + 2.0 * q * self.D[hi, gi] + q * q * w2
        return float(0.5 * w2 / a - 0.5 * num / (self.Sigma[hi] + q * self.C[hi, gi]))

    def swap(self, hi: int, gi: int, delta: float) -> None:
        """Swap S[gi] out and N[hi] in.

        Removing g is an OBS downdate with a = Hinv_gg, h_g = Hinv e_g, w_g = W_g,
        c_g = C e_g; adding h at g's position is a block-inverse update with
        v = u - e_g (u = H_{S'}^-1 H_{S'h}, read off the downdated C), the
        Schur complement sigma, the residual r_h and cov = H_Nh - C' H_Sh.
        Both steps are folded into one rank-2 update of Hinv, W, C and R and
        one rank-4 update of D, all from the current quantities.
        """
        H, G = self.prep.H, self.G
        g, h = int(self.S[gi]), int(self.N[hi])
        a = self.Hinv[gi, gi].clone()
        hg, wg, cg = self.Hinv[:, gi].clone(), self.W[gi].clone(), self.C[:, gi].clone()
        c_hg = cg[hi].clone()  # C[hi, gi]
        # quantities of the adding step, expressed through the current state
        v = self.C[hi] - hg * (c_hg / a)
        v[gi] = -1.0
        sigma = self.Sigma[hi] + c_hg * c_hg / a
        rh = self.R[hi] + wg * (c_hg / a)
        H_Sh = H[self.rS, h]
        cov = H[self.rN, h] - self.C @ H_Sh + cg * ((hg @ H_Sh) / a)
        # the pair products D = R W' need R w_g, W w_g, R r_h and W r_h
        wr = wg @ rh
        x, y, s = self.W @ wg, self.R @ wg, wg @ wg
        x2 = self.W @ rh - hg * (wr / a)  # W' r_h
        y2 = self.R @ rh + cg * (wr / a)  # R' r_h
        s2 = rh @ rh
        lhs_k = torch.stack([hg, v], 1)  # (k, 2)
        lhs_n = torch.stack([cg, cov], 1)  # (n, 2)
        inv = torch.stack([-1.0 / a, 1.0 / sigma])
        self.Hinv.addmm_(lhs_k * inv, lhs_k.T)
        self.W.addmm_(lhs_k, torch.stack([-wg / a, -rh / sigma], 0))
        self.C.addmm_(lhs_n, torch.stack([-hg / a, -v / sigma], 0))
        self.R.addmm_(lhs_n, torch.stack([wg / a, -rh / sigma], 0))
        self.D.addmm_(torch.stack([cg, y, y2, cov], 1),
                      torch.stack([x / a - hg * (s / (a * a)), -hg / a, -v / sigma, v * (s2 / (sigma * sigma)) - x2 / sigma], 0))
        self.Sigma += cg * cg / a - cov * cov / sigma
        # g takes h's place in N: its row from scratch
        self.S[gi], self.N[hi] = h, g
        self.rS[gi], self.rN[hi] = h, g
        if self.prep.parts is not None:
            self.partS[gi], self.partN[hi] = int(self.prep.parts[h]), int(self.prep.parts[g])
        HgS = H[g, self.rS]
        self.C[hi] = HgS @ self.Hinv
        self.R[hi] = G[g] - HgS @ self.W
        self.Sigma[hi] = H[g, g] - self.C[hi] @ HgS
        self.D[hi] = self.W @ self.R[hi]
        self.objective += delta


def _objective_of(prep: Prepared, G: torch.Tensor, S: np.ndarray) -> float:
    rS = _rows(prep, np.sort(S))
    L, info = torch.linalg.cholesky_ex(_sub(prep.H, rS, rS))
    if int(info) != 0:
        return math.inf
    Y = torch.linalg.solve_triangular(L, G[rS], upper=False)
    return -0.5 * float((Y * Y).sum())


def _pair_up(out_order: np.ndarray, in_order: np.ndarray, S: np.ndarray, N: np.ndarray,
             parts: np.ndarray | None, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to t (out, in) pairs in score order, each pair inside one part."""
    if parts is None:
        t = min(t, out_order.size, in_order.size)
        return S[out_order[:t]], N[in_order[:t]]
    queues: dict[int, list[int]] = {}
    for h in N[in_order]:
        queues.setdefault(int(parts[h]), []).append(int(h))
    outs, ins = [], []
    for g in S[out_order]:
        q = queues.get(int(parts[g]))
        if q:
            outs.append(int(g))
            ins.append(q.pop(0))
            if len(outs) == t:
                break
    return np.array(outs, dtype=np.int64), np.array(ins, dtype=np.int64)


def initial_swap_size(params: OsscarParams, p: int, keep: int, single_rows: bool) -> int:
    """Size of the first multi-swap. Single-row groups skip the multi-swap
    phase unless swap_size is given: their exact single swaps cost a rank-one
    update each, cheaper than one multi-swap trial."""
    if params.swap_size is None:
        t = 1 if single_rows else max(1, min(keep, p - keep) // 16)
    else:
        t = int(params.swap_size)
    return min(t, keep, p - keep)


def local_search(prep: Prepared, params: OsscarParams, S: np.ndarray, deadline: float | None) -> tuple[np.ndarray, dict]:
    inst = prep.instance
    p, keep = inst.n_groups, inst.keep
    info = {"multi_swaps": 0, "single_swaps": 0, "steps": 0, "timed_out": False}
    if keep in (0, p):
        return S, info
    G = prep.H @ prep.W
    tol = 1e-12 * abs(inst.full_objective) if prep.dtype == torch.float64 else 1e-6 * abs(inst.full_objective)
    scalar = bool(np.all(prep.sizes == 1))
    t = initial_swap_size(params, p, keep, scalar)
    state = _Support(prep, G, S) if (t > 1 or not scalar) else None

    def out_of_time() -> bool:
        if deadline is not None and time.perf_counter() > deadline:
            info["timed_out"] = True
            return True
        return False

    # Phase 1: swap the t cheapest-to-remove groups for the t best add-backs,
    # keep the move if the exact objective improves, else halve t.
    while t > 1 and info["steps"] < params.max_iter and not out_of_time():
        info["steps"] += 1
        out_order = np.argsort(state.cost.cpu().numpy(), kind="stable")
        in_order = np.argsort(-state.gain.cpu().numpy(), kind="stable")
        outs, ins = _pair_up(out_order, in_order, state.S, state.N, prep.parts, t)
        if outs.size == 0:
            break
        trial = np.union1d(np.setdiff1d(state.S, outs), ins)
        if _objective_of(prep, G, trial) < state.objective - tol:
            state = _Support(prep, G, trial)
            info["multi_swaps"] += 1
        else:
            t //= 2
    # Phase 2: best single swap, scored exactly for every pair, until none
    # improves; then the best exchange of two groups for two (small instances).
    if scalar:
        state = _ScalarSwaps(prep, G, S if state is None else state.S)
    F = None
    info["pair_swaps"] = 0
    since_reset = 0
    while info["steps"] < params.max_iter and not out_of_time():
        info["steps"] += 1
        if scalar:
            cand_vals, cand_idx = state.best_swaps(prep, params.swaps_per_scan)
            best, gain = int(cand_idx[0]), float(cand_vals[0])
        else:
            delta = state.swap_deltas(prep)
            best = int(torch.argmin(delta))
            gain = float(delta.view(-1)[best])
        trial = None
        if gain < -tol:
            h_pos, g_pos = divmod(best, state.S.size)
            if scalar and since_reset < params.refresh_every:
                # the best few swaps of this scan, on distinct groups, each
                # re-scored exactly after the previous ones are applied
                k = state.S.size
                moved_h, moved_g = set(), set()
                for value, idx in zip(cand_vals.tolist(), cand_idx.tolist()):
                    h_pos, g_pos = divmod(idx, k)
                    if h_pos in moved_h or g_pos in moved_g or not math.isfinite(value):
                        continue
                    d = gain if not moved_h else state.pair_delta(h_pos, g_pos)
                    if not d < -tol:
                        continue
                    state.swap(h_pos, g_pos, d)
                    moved_h.add(h_pos)
                    moved_g.add(g_pos)
                    since_reset += 1
                    info["single_swaps"] += 1
                    if since_reset >= params.refresh_every:
                        break
                continue
            trial = state.S.copy()
            trial[g_pos] = state.N[h_pos]
            kind = "single_swaps"
        elif scalar and since_reset and prep.dtype != torch.float64:
            # float32: confirm convergence on freshly factorized quantities
            # (in float64 the rank-one updates drift by about 1e-15 relative
            # per swap, and a refactorization every refresh_every swaps suffices)
            before = state.objective
            state.reset(state.S)
            since_reset = 0
            info["drift"] = max(info.get("drift", 0.0), abs(before - state.objective) / abs(inst.full_objective))
            continue
        elif params.pair_swap_limit:
            if F is None:
                F = output_factor(G)
            trial = _best_pair_swap(prep, F, state, params.pair_swap_limit, state.objective - tol)
            kind = "pair_swaps"
        if trial is None:
            break
        if scalar:
            before = state.objective
            state.reset(trial)
            since_reset = 0
            if not state.objective < before - 0.5 * tol:
                break
            info[kind] += 1
            continue
        new = _Support(prep, G, trial)
        if not new.objective < state.objective - 0.5 * tol:  # guard against round-off
            break
        state = new
        info[kind] += 1
    return np.sort(state.S), info


def _best_pair_swap(prep: Prepared, F: torch.Tensor, state: _Support, limit: int, below: float) -> np.ndarray | None:
    """The best support S - {g1, g2} + {h1, h2} if its f is below `below`.

    Evaluated exactly (batched Cholesky) when there are at most `limit` such
    exchanges and the groups have equal sizes; otherwise None.
    """
    S, N = state.S, state.N
    if S.size < 2 or N.size < 2 or np.any(prep.sizes != prep.sizes[0]):
        return None
    if math.comb(S.size, 2) * math.comb(N.size, 2) > limit:
        return None
    oa, ob = np.triu_indices(S.size, 1)
    ia, ib = np.triu_indices(N.size, 1)
    o_idx = np.repeat(np.arange(oa.size), ia.size)
    i_idx = np.tile(np.arange(ia.size), oa.size)
    if prep.parts is not None:  # the two groups out and in must cover the same parts
        po = np.sort(np.stack([prep.parts[S[oa]], prep.parts[S[ob]]], 1), 1)[o_idx]
        pi = np.sort(np.stack([prep.parts[N[ia]], prep.parts[N[ib]]], 1), 1)[i_idx]
        ok = np.all(po == pi, axis=1)
        o_idx, i_idx = o_idx[ok], i_idx[ok]
        if o_idx.size == 0:
            return None
    T = np.repeat(S[None, :], o_idx.size, axis=0)
    rows_n = np.arange(o_idx.size)
    T[rows_n, oa[o_idx]] = N[ia[i_idx]]
    T[rows_n, ob[o_idx]] = N[ib[i_idx]]
    b = int(prep.sizes[0])
    idx = (prep.offsets[T][:, :, None] + np.arange(b)).reshape(T.shape[0], -1)
    vals = batched_objectives(prep.H, F, torch.as_tensor(idx, device=prep.device))
    j = int(torch.argmin(vals))
    if float(vals[j]) < below:
        return np.sort(T[j])
    return None


# -------------------------------------------------------------------- solver
@register
class Osscar(Solver):
    name = "osscar"
    exact = False
    devices = ("cpu", "cuda")
    Params = OsscarParams
    description = "OSSCAR greedy backward elimination + swap local search (torch, CPU/CUDA)"

    def prepare(self, instance: Instance, params: OsscarParams, device: str) -> Prepared:
        dev = torch.device(device)
        dtype = _DTYPES[params.dtype]
        order = np.argsort(instance.groups, kind="stable")
        sizes = instance.group_sizes.astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        H = _device_H(instance, dev, dtype)
        if instance.group_size is not None:
            W = torch.as_tensor(instance.W, device=dev, dtype=dtype)
        else:
            W = torch.as_tensor(instance.W[order], device=dev, dtype=dtype)
        part = instance.partition
        return Prepared(
            instance=instance, H=H, W=W, sizes=sizes, offsets=offsets,
            parts=None if part is None else part.parts,
            budget=None if part is None else part.budget.copy(),
            device=dev, dtype=dtype,
        )

    def run(self, prep: Prepared, params: OsscarParams, deadline: float | None) -> Result:
        t0 = time.perf_counter()
        try:
            S = greedy(prep, params)
        finally:
            _restore_H(prep)
        _sync(prep.device)
        t1 = time.perf_counter()
        info: dict[str, Any] = {"greedy_seconds": t1 - t0, "greedy_keep": S.tolist()}
        if params.local_search:
            S, ls = local_search(prep, params, S, deadline)
            _sync(prep.device)
            info.update(ls)
            info["local_search_seconds"] = time.perf_counter() - t1
        timed_out = deadline is not None and time.perf_counter() > deadline
        status = Status.TIME_LIMIT if timed_out else Status.FEASIBLE
        return Result(keep=S, status=status, info=info)


def prepare_tensors(instance: Instance, device: Any, dtype: str = "float64") -> Prepared:
    """H and W_hat on `device` in `dtype`, rows permuted so groups are contiguous
    (group g owns rows offsets[g] .. offsets[g] + sizes[g] - 1, groups in id order)."""
    return Osscar().prepare(instance, OsscarParams(dtype=dtype), str(device))


take_lowest = _take_lowest


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
