"""Perspective relaxation of a branch-and-bound node, solved in numpy (CPU) or torch (CUDA).

A node fixes some groups in (set I) and some out (set O); the rest are free.
With the root split D (diagonal, validated) the node uses rows R = rows of
I and free groups and the node diagonal

    Dn = t * [delta * D_I, D_free],   t = lambda_min(Dn0^-1/2 H_RR Dn0^-1/2) (>= 1 up to delta)

(so H_RR - Dn is PSD: a principal submatrix needs less room, and groups
fixed in need no perspective term, which frees room for the others). Its
relaxation over z in Z_node = {z in [0,1]^free, sum over each part = budget
left} is

    c(z) = -0.5 tr((sF)' M^-1 (sF)),  M = S A S + Dn,  A = H_RR - Dn,  s_i = sqrt(z_g(i)),

with gradient dc/dz_g = -0.5 q_g and Hessian (per row, summed over groups)

    diag(q_i / z_i) - (M^-1 o V V') / (s s'),   V = F_R - A W,  W = S M^-1 S F_R,

and every W gives the valid Fenchel bound (see `exact.perspective`)

    LB(W) = -0.5 tr(W'AW) - 0.5 sum_{g in I} q_g - 0.5 max_{feasible free S} sum_{g in S} q_g.

`NodeRelaxation.solve` minimizes c by a projected Newton method
(Bertsekas's two-metric scheme: an epsilon-active set at 0 and 1 is moved to
the bound, Newton on the rest with the per-part sum kept, Armijo search
along the projection arc, projected-gradient fallback). The returned bound
is the best LB(W) over the iterates: valid whether or not it converged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg.lapack import dpotrf as _potrf
from scipy.linalg.lapack import dpotri as _potri
from scipy.linalg.lapack import dpotrs as _potrs
from scipy.linalg.lapack import dsyevr as _syevr

_EPS = float(np.finfo(np.float64).eps)


def project_capped(y: np.ndarray, need: float) -> np.ndarray:
    """Euclidean projection of y onto {z in [0, 1]^n : sum z = need} (exact, by breakpoints)."""
    n = y.size
    if need <= 0:
        return np.zeros(n)
    if need >= n:
        return np.ones(n)
    taus = np.sort(np.concatenate([y - 1.0, y]))
    # sum_i clip(y_i - tau, 0, 1) = P(tau) - P(tau + 1), P(t) = sum_i max(y_i - t, 0), from suffix sums
    ys = np.sort(y)
    suffix = np.concatenate([np.cumsum(ys[::-1])[::-1], [0.0]])

    def P(t):
        i = np.searchsorted(ys, t, side="right")
        return suffix[i] - (n - i) * t

    sums = P(taus) - P(taus + 1.0)  # nonincreasing in tau
    j = int(np.searchsorted(-sums, -need, side="right"))  # first index with sums < need
    j = min(max(j, 1), taus.size - 1)
    s_hi, s_lo = sums[j - 1], sums[j]
    ta, tb = taus[j - 1], taus[j]
    tau = ta if s_hi == s_lo else ta + (s_hi - need) / (s_hi - s_lo) * (tb - ta)
    return np.clip(y - tau, 0.0, 1.0)


@dataclass
class RootData:
    """Everything a node needs from the instance, on the solver's device."""

    H: torch.Tensor  # (d, d)
    F: torch.Tensor  # (d, r)
    D: np.ndarray  # (d,) validated root diagonal split
    D_t: torch.Tensor
    group_rows: list  # rows of every group (numpy int64)
    sizes: np.ndarray  # rows per group
    parts: np.ndarray  # part id per group
    budget: np.ndarray  # groups kept per part
    fixed_in_delta: float = 1e-3

    def __post_init__(self):
        # the row of every group when each has exactly one (None otherwise)
        self.single_rows = np.array([r[0] for r in self.group_rows], dtype=np.int64) \
            if np.all(self.sizes == 1) else None

    @property
    def p(self) -> int:
        return self.sizes.size


class NodeRelaxation:
    """The perspective relaxation of one node (fixings given as boolean masks over groups)."""

    def __init__(self, root: RootData, fixed_in: np.ndarray, free: np.ndarray, D: np.ndarray | None = None):
        """D: a positive diagonal to start from (default the root split); any works, it is rescaled here."""
        self.root = root
        D = root.D if D is None else D
        dev, dt = root.H.device, root.H.dtype
        self.fixed_in_groups = np.flatnonzero(fixed_in)
        self.free_groups = np.flatnonzero(free)
        single_rows = root.single_rows
        if single_rows is not None:  # one row per group (neurons): no per-group lists
            r_in, r_free = single_rows[self.fixed_in_groups], single_rows[self.free_groups]
        else:
            rows_in = [root.group_rows[g] for g in self.fixed_in_groups]
            r_in = np.concatenate(rows_in) if rows_in else np.zeros(0, np.int64)
            r_free = np.concatenate([root.group_rows[g] for g in self.free_groups])
        self.n1 = r_in.size
        rows = np.concatenate([r_in, r_free])
        self.pf = self.free_groups.size
        self.singletons = r_free.size == self.pf
        self.grp = np.arange(self.pf) if self.singletons else \
            np.repeat(np.arange(self.pf), root.sizes[self.free_groups])  # free-local group of each free row
        self.grp_t = None if dev.type == "cpu" else torch.as_tensor(self.grp, device=dev)
        # parts of the free groups and what each still needs
        if root.budget.size == 1:
            self.labels, self.fpart = np.zeros(1, np.int64), np.zeros(self.pf, np.int64)
            self.need = np.array([int(root.budget[0]) - self.fixed_in_groups.size])
            self.members = [np.arange(self.pf)]
        else:
            fparts = root.parts[self.free_groups]
            self.labels, self.fpart = np.unique(fparts, return_inverse=True)
            self.need = np.array([int(root.budget[j]) - int(np.sum(root.parts[self.fixed_in_groups] == j))
                                  for j in self.labels])
            self.members = [np.flatnonzero(self.fpart == j) for j in range(self.labels.size)]
        D0 = np.concatenate([root.fixed_in_delta * D[r_in], D[r_free]])
        self.evaluations = 0
        # small node problems are dominated by per-call overhead: on the CPU they run in
        # numpy with direct LAPACK calls, on CUDA in torch
        self.cpu = dev.type == "cpu"
        if self.cpu:
            H = root.H.numpy()
            HR = H[rows[:, None], rows[None, :]]
            sc = 1.0 / np.sqrt(D0)
            B = sc[:, None] * HR * sc[None, :]
            w, _, _, _, info = _syevr(B, compute_v=0, range="I", il=1, iu=1, lower=1)
            if info != 0:
                raise np.linalg.LinAlgError("node split: the smallest eigenvalue failed")
            lam = float(w[0])
            t = lam - 16 * rows.size * _EPS * float(np.max(np.abs(B).sum(1)))  # Gershgorin: >= |lambda_max|
            self.scale = t * (1.0 - 1e-10)
            self.Dn = D0 * self.scale
            self.A = HR.copy()
            self.A[np.diag_indices(rows.size)] -= self.Dn
            self.FR = root.F.numpy()[rows]
            if not self.singletons:  # free rows -> free groups, for the group sums of the Hessian
                self.E = np.zeros((self.grp.size, self.pf))
                self.E[np.arange(self.grp.size), self.grp] = 1.0
            return
        idx = torch.as_tensor(rows, device=dev)
        HR = root.H[idx][:, idx]
        D0_t = torch.as_tensor(D0, device=dev, dtype=dt)
        # t = lambda_min(D0^-1/2 H_RR D0^-1/2) less its rounding error: H_RR - t D0 is PSD
        sc = D0_t.rsqrt()
        ev = torch.linalg.eigvalsh(sc[:, None] * HR * sc[None, :])
        t = float(ev[0]) - 16 * rows.size * _EPS * float(ev[-1].abs())
        self.scale = t * (1.0 - 1e-10)
        self.Dn = D0_t * self.scale
        self.A = HR - torch.diag(self.Dn)
        self.FR = root.F[idx]

    # ------------------------------------------------------------- pieces
    def top_free(self, qg: np.ndarray) -> float:
        """max over feasible free selections of sum q (top need_j of every part)."""
        total = 0.0
        for mem, k in zip(self.members, self.need):
            if k > 0:
                total += float(np.sum(np.sort(qg[mem])[::-1][:k]))
        return total

    def evaluate(self, z: np.ndarray) -> dict | None:
        """c(z), gradient, q, W and the Fenchel bound LB(W); None if M is not PD numerically."""
        self.evaluations += 1
        if self.cpu:
            return self._evaluate_np(z)
        dev, dt = self.A.device, self.A.dtype
        zt = torch.as_tensor(z, device=dev, dtype=dt)
        s = torch.ones(self.A.shape[0], device=dev, dtype=dt)
        s[self.n1:] = zt.clamp(0.0, 1.0).sqrt()[self.grp_t]
        M = self.A * (s[:, None] * s[None, :])
        M.diagonal().add_(self.Dn)
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0:
            return None
        sF = s[:, None] * self.FR
        Y = torch.cholesky_solve(sF, L)
        W = s[:, None] * Y
        c = -0.5 * float((sF * Y).sum())
        AW = self.A @ W
        V = self.FR - AW
        qrow = (V * V).sum(1) / self.Dn
        q_in = float(qrow[: self.n1].sum())
        qf = qrow[self.n1:]
        if self.singletons:
            qg = qf
        else:
            qg = torch.zeros(self.pf, device=dev, dtype=dt).index_add_(0, self.grp_t, qf)
        qg_np = qg.cpu().numpy().astype(np.float64)
        base = -0.5 * float((W * AW).sum()) - 0.5 * q_in
        lb = base - 0.5 * self.top_free(qg_np)
        return {"c": c, "q": qg_np, "base": base, "lb": lb, "L": L, "V": V, "s": s, "qrow": qrow, "z": z}

    def _evaluate_np(self, z: np.ndarray) -> dict | None:
        """`evaluate` in numpy and LAPACK (same quantities; "L" is the LAPACK factor)."""
        n1 = self.n1
        s = np.ones(self.A.shape[0])
        s[n1:] = np.sqrt(np.clip(z, 0.0, 1.0))[self.grp]
        M = self.A * np.outer(s, s)
        M[np.diag_indices(s.size)] += self.Dn
        L, info = _potrf(M.T, lower=1, clean=0, overwrite_a=1)  # M is symmetric: M.T is its Fortran-order view
        if info != 0:
            return None
        sF = s[:, None] * self.FR
        Y, info = _potrs(L, sF, lower=1)
        if info != 0:
            return None
        W = s[:, None] * Y
        c = -0.5 * float(np.vdot(sF, Y))
        AW = self.A @ W
        V = self.FR - AW
        qrow = np.einsum("ij,ij->i", V, V) / self.Dn
        q_in = float(qrow[:n1].sum())
        qf = qrow[n1:]
        qg = qf if self.singletons else np.bincount(self.grp, weights=qf, minlength=self.pf)
        base = -0.5 * float(np.vdot(W, AW)) - 0.5 * q_in
        lb = base - 0.5 * self.top_free(qg)
        return {"c": c, "q": qg, "base": base, "lb": lb, "L": L, "V": V, "s": s, "qrow": qrow, "z": z}

    def _hessian_np(self, ev: dict) -> np.ndarray:
        n1 = self.n1
        Minv, info = _potri(ev["L"], lower=1)
        if info != 0:
            raise np.linalg.LinAlgError("node Hessian: M^-1 failed")
        Minv = np.tril(Minv)
        Minv = (Minv + np.tril(Minv, -1).T)[n1:, n1:]
        Vf = ev["V"][n1:]
        sf = np.maximum(ev["s"][n1:], 1e-150)
        Hr = -(Minv * (Vf @ Vf.T)) / np.outer(sf, sf)
        Hr[np.diag_indices(sf.size)] += ev["qrow"][n1:] / np.maximum(sf * sf, 1e-300)
        if not self.singletons:
            Hr = self.E.T @ Hr @ self.E
        return Hr

    def hessian(self, ev: dict) -> np.ndarray:
        """The Hessian of c over the free groups at the evaluated point (pf x pf)."""
        if self.cpu:
            return self._hessian_np(ev)
        n1 = self.n1
        Minv = torch.cholesky_inverse(ev["L"])[n1:, n1:]
        Vf = ev["V"][n1:]
        sf = ev["s"][n1:].clamp_min(1e-150)
        Hr = -(Minv * (Vf @ Vf.T)) / (sf[:, None] * sf[None, :])
        zr = (sf * sf).clamp_min(1e-300)
        Hr.diagonal().add_(ev["qrow"][n1:] / zr)
        if not self.singletons:
            pf = self.pf
            Hg = torch.zeros(pf, Hr.shape[1], device=Hr.device, dtype=Hr.dtype).index_add_(0, self.grp_t, Hr)
            Hr = torch.zeros(pf, pf, device=Hr.device, dtype=Hr.dtype).index_add_(1, self.grp_t, Hg)
        return Hr.cpu().numpy()

    def project(self, y: np.ndarray) -> np.ndarray:
        z = np.empty_like(y)
        for mem, k in zip(self.members, self.need):
            z[mem] = project_capped(y[mem], k)
        return z

    def initial(self, z0: np.ndarray | None) -> np.ndarray:
        if z0 is None:
            z = np.empty(self.pf)
            for mem, k in zip(self.members, self.need):
                z[mem] = k / mem.size
            return z
        return self.project(np.asarray(z0, dtype=np.float64))

    # ------------------------------------------------------------- solver
    def solve(self, z0: np.ndarray | None, prune_at: float | None, max_steps: int = 30, min_steps: int = 2,
              rtol: float = 1e-10, deadline: float | None = None, trace: list | None = None) -> dict:
        """Projected Newton on c over Z_node. Returns the best bound and its (base, q).

        Stops when the bound reaches `prune_at` ("prune"), when c(z) < prune_at
        after `min_steps` steps (the node cannot be pruned: "branch"), when the
        gap c - bound is below rtol |c| ("converged"), or after max_steps.
        prune_at=None solves to convergence. `trace` collects every iterate z.
        """
        z = self.initial(z0)
        ev = self.evaluate(z)
        if ev is None:
            return {"lb": -math.inf, "z": z, "status": "failed", "steps": 0}
        best = ev
        step_pg = None
        status = "max_steps"
        steps = 0
        for steps in range(max_steps + 1):
            if ev["lb"] > best["lb"]:
                best = ev
            c = ev["c"]
            if trace is not None:
                trace.append(ev["z"])
            if prune_at is not None and best["lb"] >= prune_at:
                status = "prune"
                break
            if prune_at is not None and steps >= min_steps and c < prune_at:
                status = "branch"
                break
            if c - best["lb"] <= rtol * abs(c):
                status = "converged"
                break
            if steps == max_steps or (deadline is not None and time.perf_counter() > deadline):
                break
            g = -0.5 * ev["q"]
            new = self._newton_step(ev, g)
            if new is None:
                if step_pg is None:
                    step_pg = 1.0 / (float(np.max(np.abs(g))) + 1e-300)
                new = None
                for _ in range(60):
                    zn = self.project(z - step_pg * g)
                    cand = self.evaluate(zn)
                    if cand is not None and cand["c"] <= c + g @ (zn - z) + 0.5 / step_pg * float(np.sum((zn - z) ** 2)):
                        new = cand
                        break
                    step_pg *= 0.5
                step_pg *= 2.0
                if new is None:
                    break
            ev, z = new, new["z"]
        return {"lb": best["lb"], "base": best["base"], "q": best["q"], "z": z, "c": ev["c"],
                "status": status, "steps": steps}

    def _newton_step(self, ev: dict, g: np.ndarray) -> dict | None:
        z = ev["z"]
        y = z - g / (float(np.max(np.abs(g))) + 1e-300)
        w = float(np.sum(np.abs(z - self.project(y))))
        eps = min(1e-2, w)
        inactive = np.ones(self.pf, bool)
        dA = np.zeros(self.pf)
        for mem in self.members:
            zm, gm = z[mem], g[mem]
            frac = (zm > eps) & (zm < 1 - eps)
            if frac.any():
                mu = float(np.mean(gm[frac]))
            else:
                srt = np.sort(gm)
                k = int(round(float(np.sum(zm))))
                mu = 0.5 * (srt[max(k - 1, 0)] + srt[min(k, srt.size - 1)])
            at0 = (zm <= eps) & (gm > mu)
            at1 = (zm >= 1 - eps) & (gm < mu)
            inactive[mem[at0 | at1]] = False
            dA[mem[at0]] = -zm[at0]
            dA[mem[at1]] = 1 - zm[at1]
        I = np.flatnonzero(inactive)
        if I.size < 2:
            return None
        Hs = self.hessian(ev)[np.ix_(I, I)]
        Hs = Hs + (1e-12 * float(np.trace(Hs)) / I.size) * np.eye(I.size)
        Lh, info = _potrf(Hs, lower=1, clean=0)
        if info != 0:
            return None

        fp = self.fpart[I]
        B = (fp[None, :] == np.arange(self.labels.size)[:, None]).astype(np.float64)
        used = B.sum(1) > 0
        B = B[used]
        rhs = np.array([-float(np.sum(dA[mem])) for mem in self.members])[used]
        Hg = _potrs(Lh, g[I], lower=1)[0]
        HB = _potrs(Lh, B.T, lower=1)[0]
        S = B @ HB
        nu = np.linalg.solve(S, rhs + B @ Hg)
        d = dA.copy()
        d[I] = -(Hg - HB @ nu)
        c = ev["c"]
        alpha = 1.0
        for _ in range(20):
            zn = self.project(z + alpha * d)
            slope = float(g @ (zn - z))
            if slope >= 0:  # the projected arc is not a descent direction here
                return None
            cand = self.evaluate(zn)
            if cand is not None and cand["c"] <= c + 1e-4 * slope:
                return cand
            alpha *= 0.5
        return None
