"""The perspective split H = (H - D) + D, its choice of D, and the relaxation bound.

For a block-diagonal D = blkdiag(D_1, ..., D_p) (one PSD block per group)
with H - D PSD, the MIQP

    min_{W, z}  0.5 tr(W'HW) - tr(F'W)
    s.t.        W_g = 0 unless z_g = 1,  z binary,  sum_g z_g = keep (or a budget per part)

(F F' = G G', see `exact._common.output_factor`) has the strong perspective
formulation

    min  0.5 tr(W'(H - D)W) + sum_g 0.5 tr(W_g' D_g W_g) / z_g - tr(F'W)

and its continuous relaxation (z in [0, 1]) is the perspective relaxation

    c(z) = -0.5 tr(F' (H - D + D Z^-1)^-1 F),   min over the capped simplex Z.

Lower bound used by every solver here (a Fenchel argument, valid for ANY W):
with A = H - D PSD and V = F - A W, q_g = tr(V_g' D_g^-1 V_g),

    f(S) >= -0.5 tr(W'AW) - 0.5 sum_{g in S} q_g          for every support S,

because 0.5 tr(U'AU) >= tr(W'AU) - 0.5 tr(W'AW) and
0.5 tr(U_g'D_gU_g) >= tr(V_g'U_g) - 0.5 q_g for the optimal weights U of S.
Maximizing the right side over feasible S (top `keep` q's, per part with a
partition) gives a bound that needs no solver accuracy at all: a first-order
method only has to find a good W. At W = W(z) it equals the linearization
c(z) + min_{z' in Z} grad c(z)'(z' - z) (the Frank-Wolfe dual bound).

Choices of D (`split_for(instance, method)`):

* ``lambda-min``: D = lambda_min(H) I (cheap, weak).
* ``conditional``: D = t / diag(H^-1), the largest multiple that keeps H - D
  PSD. 1 / (H^-1)_ii (the conditional variance of feature i given the others)
  is the most any D_i can be, so this spreads D like the SDP solution does, at
  the price of one inverse and one eigenvalue. On full SmolLM2 / MiniLM
  down_proj layers (d = 1536) its sum is 1.7-4x that of lambda-min and the
  certified gap of the root bound drops from 55-79% to 40-48%.
* ``max-trace``: the SDP  max sum_i D_ii  s.t. H - D PSD, D PSD, diagonal or
  block-diagonal per group (cvxpy); ``backend="newton"`` solves the diagonal
  case by a log-barrier Newton method without cvxpy.
* ``optimal``: the diagonal D that maximizes the relaxation bound itself,
  max_D min_{z in Z} c_D(z) (Dong, Chen and Linderoth 2015: this equals the
  Shor-type SDP relaxation with perspective constraints). Solved as the
  convex-concave saddle problem min_z max_D phi(D o (1/z - 1)),
  phi(u) = -0.5 tr(F'(H + Diag(u))^-1 F), by a primal-dual barrier Newton
  method; no cvxpy. On SmolLM2 down_proj crops it closes about a third of the
  root gap left by max-trace (e.g. 10.7% -> 6.9% on 60 neurons).

Every D is validated before use: it is shrunk until lambda_min(H - D) is
provably >= 0 (a bound computed with an invalid D would be invalid).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from osscar_opt.errors import SolverError
from osscar_opt.instance import Instance

from ._common import output_factor, parts_and_budget

SPLIT_METHODS = ("optimal", "max-trace", "lambda-min", "conditional")
_EPS = np.finfo(np.float64).eps


# ------------------------------------------------------------------ the split
@dataclass(frozen=True)
class PerspectiveSplit:
    """A validated D: H - D is positive semidefinite with margin `min_eig`.

    D is a vector (d,) for a diagonal split, or a (d, d) matrix that is
    block-diagonal over the groups.
    """

    method: str
    D: np.ndarray
    shrink: float  # factor applied by validation (1 = unchanged)
    min_eig: float  # lambda_min(H - D) as verified (minus its rounding error bound)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def is_diagonal(self) -> bool:
        return self.D.ndim == 1

    def diagonal(self) -> np.ndarray:
        return self.D if self.is_diagonal else np.diag(self.D).copy()

    def dense(self) -> np.ndarray:
        return np.diag(self.D) if self.is_diagonal else self.D

    def total(self) -> float:
        """sum_i D_ii (what max-trace maximizes)."""
        return float(np.sum(self.diagonal()))


def _fingerprint(*arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def validate_split(H: np.ndarray, D: np.ndarray, method: str = "custom", seconds: float = 0.0,
                   floor: float = 1e-9, info: dict | None = None) -> PerspectiveSplit:
    """Shrink D (by a scalar t <= 1) until H - tD is provably PSD; return the split.

    Blocks of D are first made PSD with every eigenvalue >= floor * lambda_min(H)
    (the bound divides by D). Then t = min(1, lambda_min(D^-1/2 H D^-1/2)) less
    its rounding error, and lambda_min(H - tD) is checked against
    16 d eps ||H|| (more than the error of the eigenvalue solver).
    """
    H = np.asarray(H, dtype=np.float64)
    d = H.shape[0]
    D = np.array(D, dtype=np.float64, copy=True)
    evH = scipy.linalg.eigvalsh(H, check_finite=False)
    lam_H, norm_H = float(evH[0]), float(evH[-1])
    if not lam_H > 0:
        raise SolverError("H is not positive definite: rebuild the instance with damping")
    low = floor * lam_H
    if D.ndim == 1:
        if D.shape != (d,) or not np.all(np.isfinite(D)):
            raise SolverError(f"a diagonal split needs {d} finite entries, got shape {D.shape}")
        D = np.maximum(D, low)
        s = 1.0 / np.sqrt(D)
        ev = scipy.linalg.eigvalsh(s[:, None] * H * s[None, :], check_finite=False)
    else:
        if D.shape != (d, d) or not np.all(np.isfinite(D)):
            raise SolverError(f"a block split needs a finite {d} x {d} matrix, got shape {D.shape}")
        D = 0.5 * (D + D.T)
        w, U = np.linalg.eigh(D)
        D = (U * np.maximum(w, low)) @ U.T
        D = 0.5 * (D + D.T)
        L = np.linalg.cholesky(D)
        X = scipy.linalg.solve_triangular(L, H, lower=True, check_finite=False)
        X = scipy.linalg.solve_triangular(L, X.T, lower=True, check_finite=False)
        ev = scipy.linalg.eigvalsh(0.5 * (X + X.T), check_finite=False)
    t = float(ev[0]) - 16 * d * _EPS * float(abs(ev[-1]))
    t = min(1.0, t * (1.0 - 1e-10))
    if not t > 0:
        raise SolverError(f"the {method} split leaves no room: H - tD is not PSD for any t > 0 (H too ill-conditioned)")
    margin = 16 * d * _EPS * norm_H
    Dm = np.diag(D) if D.ndim == 1 else D
    for _ in range(4):
        lam = float(scipy.linalg.eigvalsh(H - t * Dm, check_finite=False, subset_by_index=[0, 0])[0])
        if lam >= margin:
            break
        # H - t'D = (1 - a) H + a (H - tD) with a = t'/t has lambda_min >= (1 - a) lam_H + a lam
        t *= max(0.0, (lam_H - 2 * margin) / (lam_H - lam))
    else:
        raise SolverError(f"could not validate the {method} split: H - D stays indefinite after shrinking")
    return PerspectiveSplit(method, t * D, t, lam - margin, seconds, dict(info or {}))


# -------------------------------------------------------------------- splits
def lambda_min_split(H: np.ndarray) -> PerspectiveSplit:
    """D = lambda_min(H) I, validated."""
    t0 = time.perf_counter()
    lam = float(scipy.linalg.eigvalsh(H, check_finite=False, subset_by_index=[0, 0])[0])
    return validate_split(H, np.full(H.shape[0], lam), "lambda-min", time.perf_counter() - t0)


def conditional_split(H: np.ndarray) -> PerspectiveSplit:
    """D = t / diag(H^-1), t as large as keeps H - D PSD (validate_split finds t)."""
    t0 = time.perf_counter()
    try:
        inv_diag = np.diag(_spd_inverse(H))
    except np.linalg.LinAlgError:
        raise SolverError("H is not positive definite: rebuild the instance with damping") from None
    return validate_split(H, 1.0 / inv_diag, "conditional", time.perf_counter() - t0)


def max_trace_diagonal_newton(H: np.ndarray, weights: np.ndarray | None = None, gap: float = 1e-9,
                              deadline: float | None = None) -> np.ndarray:
    """max w'D s.t. H - Diag(D) PSD, D >= 0, by a log-barrier Newton method.

    Maximizes w'D + mu (log det(H - Diag(D)) + sum log D_i) for mu -> 0; the
    duality gap of the barrier problem is mu * 2d. Returns the (unvalidated)
    diagonal; w defaults to all ones (the max-trace SDP).
    """
    d = H.shape[0]
    scale = float(np.mean(np.diag(H)))
    Hn = H / scale
    w = np.ones(d) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / max(float(np.sum(np.abs(w))), 1e-300)
    lam = float(scipy.linalg.eigvalsh(Hn, check_finite=False, subset_by_index=[0, 0])[0])
    D = np.full(d, 0.5 * lam)
    mu = 0.1 / d
    while True:
        for _ in range(60):
            if deadline is not None and time.perf_counter() > deadline:
                return D * scale
            Ainv = scipy.linalg.cho_solve(scipy.linalg.cho_factor(Hn - np.diag(D)), np.eye(d))
            grad = w - mu * np.diag(Ainv) + mu / D
            neg_hess = mu * (Ainv * Ainv) + mu * np.diag(1.0 / D**2)
            try:
                step = scipy.linalg.cho_solve(scipy.linalg.cho_factor(neg_hess), grad)
            except np.linalg.LinAlgError:  # the barrier Hessian is at the limit of fp64: D is as good as it gets
                return D * scale
            if not np.all(np.isfinite(step)):
                return D * scale
            decrement = float(grad @ step)
            a = 1.0
            with np.errstate(divide="ignore"):
                neg = step < 0
                if np.any(neg):
                    a = min(1.0, 0.99 * float(np.min(-D[neg] / step[neg])))
            while a > 1e-12:
                Dn = D + a * step
                try:
                    np.linalg.cholesky(Hn - np.diag(Dn))
                    break
                except np.linalg.LinAlgError:
                    a *= 0.5
            D = D + a * step
            if decrement < 1e-12 or (a == 1.0 and decrement < 1e-4 * mu):
                break
        if 2 * d * mu <= gap * max(float(w @ D), 1e-300):
            break
        mu *= 0.2
    return D * scale


def max_trace_split(H: np.ndarray, groups: np.ndarray | None = None, block: bool = False,
                    backend: str = "cvxpy", solver: str | None = None,
                    time_limit: float | None = None) -> PerspectiveSplit:
    """The SDP  max sum_i D_ii  s.t. H - D PSD, D PSD; diagonal or block-diagonal.

    With block=True (groups of more than one row) D is block-diagonal with a
    full PSD block per group. backend "cvxpy" (Clarabel, else SCS) or
    "newton" (diagonal only, no cvxpy).
    """
    t0 = time.perf_counter()
    d = H.shape[0]
    if backend == "newton":
        if block:
            raise SolverError("the newton backend solves diagonal splits only: use backend='cvxpy' for block=True")
        D = max_trace_diagonal_newton(H)
        return validate_split(H, D, "max-trace", time.perf_counter() - t0)
    if backend != "cvxpy":
        raise SolverError(f"unknown max-trace backend {backend!r}: use 'cvxpy' or 'newton'")
    try:
        import cvxpy as cp
    except ImportError:
        raise SolverError("the max-trace split needs cvxpy: pip install 'osscar-opt[exact]'") from None
    import scipy.sparse as sp

    s = np.sqrt(np.diag(H))
    Hn = H / np.outer(s, s)  # D = S Dn S keeps the block structure; better conditioned
    if not block or groups is None or np.all(np.bincount(groups) == 1):
        x = cp.Variable(d)
        cons = [Hn - cp.diag(x) >> 0, x >= 0]
        objective = cp.Maximize(cp.sum(cp.multiply(s**2, x)))
        expr = None
    else:
        members = [np.flatnonzero(groups == g) for g in range(int(groups.max()) + 1)]
        blocks, parts = [], []
        for rows in members:
            b = rows.size
            X = cp.Variable((b, b), symmetric=True) if b > 1 else cp.Variable((1, 1))
            blocks.append(X)
            P = sp.csr_matrix((np.ones(b), (rows, np.arange(b))), shape=(d, b))
            parts.append(P @ X @ P.T)
        expr = cp.sum(parts) if len(parts) > 1 else parts[0]
        cons = [Hn - expr >> 0] + [X >> 0 for X in blocks]
        objective = cp.Maximize(cp.sum(cp.multiply(s**2, cp.diag(expr))))
    prob = cp.Problem(objective, cons)
    installed = cp.installed_solvers()
    name = solver or ("CLARABEL" if "CLARABEL" in installed else "SCS")
    opts = {}
    if time_limit is not None:
        opts = {"time_limit": float(time_limit)} if name == "CLARABEL" else {"time_limit_secs": float(time_limit)} if name == "SCS" else {}
    try:
        prob.solve(solver=name, **opts)
    except cp.error.SolverError as exc:
        raise SolverError(f"the max-trace SDP failed in {name} ({exc}): try solver='SCS' or the 'optimal' split") from None
    if expr is None:
        if x.value is None:
            raise SolverError(f"the max-trace SDP returned no solution ({prob.status}): give it more time or use split='optimal'")
        D = np.maximum(np.asarray(x.value), 0.0) * s**2
    else:
        if expr.value is None:
            raise SolverError(f"the block max-trace SDP returned no solution ({prob.status}): give it more time or use block=False")
        Dn = np.asarray(expr.value.toarray() if hasattr(expr.value, "toarray") else expr.value)
        D = Dn * np.outer(s, s)
        mask = groups[:, None] == groups[None, :]
        D = np.where(mask, D, 0.0)
    return validate_split(H, D, "max-trace", time.perf_counter() - t0, info={"sdp_status": prob.status, "block": bool(expr is not None)})


def optimal_diagonal(H: np.ndarray, F: np.ndarray, groups: np.ndarray, parts: np.ndarray, budget: np.ndarray,
                     deadline: float | None = None, mu_final: float = 1e-9,
                     fixed_in: np.ndarray | None = None, fixed_out: np.ndarray | None = None,
                     D_start: np.ndarray | None = None, z_start: np.ndarray | None = None,
                     mu_start: float = 1e-3, max_steps: int = 60, psd_step: float = 0.0,
                     lam: float | None = None) -> tuple[np.ndarray, dict]:
    """The diagonal D maximizing the perspective relaxation bound (unvalidated).

    Solves  min_{z in Z} max_{D >= 0, H - Diag(D) PSD} phi(D o e(z)),
    e_i = 1/z_{g(i)} - 1, phi(u) = -0.5 tr(F'(H + Diag(u))^-1 F),
    which is convex in z and concave in D, with log barriers on 0 < z < 1,
    D > 0 and H - Diag(D) > 0, by Newton steps on the saddle-point KKT system
    (per-part equality constraints on z), mu from `mu_start` down to
    `mu_final`, at most `max_steps` steps per mu. With psd_step > 0 every step
    goes that fraction of the way to the boundary of H - Diag(D) > 0 (or the
    full Newton step when shorter) and is taken without the residual line
    search: the cheap refinement a branch-and-bound node applies to its
    parent's D (4 such steps at mu = 1e-5 take about 6 ms on 100 rows).
    lam: lambda_min(H) when the caller has it.
    Groups fixed in (z = 1) get D = 0 inside the solve, fixed-out rows are
    dropped; both get a small positive D in the result. A warm start (a
    branch-and-bound parent's D and z, with a smaller mu_start) is pulled
    into the interior first: D_start is valid for a superset of the rows, so
    0.95 D_start is strictly feasible here.

    Derivatives (a_i = 0.5 ||W_i||^2, W = (H + Diag u)^-1 F, Pi = K o WW'):
    dphi/du = a, d2phi/du2 = -Pi.
    """
    d, p = H.shape[0], int(groups.max()) + 1
    fixed_in = np.zeros(p, bool) if fixed_in is None else fixed_in.copy()
    fixed_out = np.zeros(p, bool) if fixed_out is None else fixed_out.copy()
    # parts whose budget leaves no choice are fixed
    for j in range(budget.size):
        free = (parts == j) & ~fixed_in & ~fixed_out
        need = int(budget[j]) - int(np.sum((parts == j) & fixed_in))
        if need <= 0:
            fixed_out |= free
        elif need >= int(free.sum()):
            fixed_in |= free
    free_g = np.flatnonzero(~fixed_in & ~fixed_out)
    info = {"newton_steps": 0, "free_groups": int(free_g.size)}
    if lam is None:  # lambda_min(H): the D of the rows outside the solve
        lam = float(scipy.linalg.eigvalsh(H, check_finite=False, subset_by_index=[0, 0])[0])
    if free_g.size == 0:
        return np.full(d, lam), info
    row_in = fixed_in[groups]
    row_free = ~fixed_in[groups] & ~fixed_out[groups]
    rows = np.concatenate([np.flatnonzero(row_in), np.flatnonzero(row_free)])
    n1 = int(row_in.sum())
    sH = float(np.mean(np.diag(H)))
    HR = H[np.ix_(rows, rows)] / sH
    L0 = np.linalg.cholesky(HR)
    FR = F[rows]
    full = 0.5 * float(np.sum(scipy.linalg.solve_triangular(L0, FR, lower=True) ** 2))
    FR = FR / math.sqrt(max(full, 1e-300))  # phi in units of |f(rows)|
    gidx = {g: i for i, g in enumerate(free_g)}
    grp = np.array([gidx[g] for g in groups[rows[n1:]]])  # free-local group of each free row
    nf, pf = rows.size - n1, free_g.size
    E = np.zeros((nf, pf))
    E[np.arange(nf), grp] = 1.0
    singletons = nf == pf and bool(np.all(grp == np.arange(pf)))  # E = I: products become scalings
    free_diag = (np.arange(n1, n1 + nf), np.arange(n1, n1 + nf))
    fparts = parts[free_g]
    labels, fpart = np.unique(fparts, return_inverse=True)
    B = np.zeros((labels.size, pf))
    B[fpart, np.arange(pf)] = 1.0
    need = np.array([int(budget[j]) - int(np.sum((parts == j) & fixed_in)) for j in labels], dtype=np.float64)
    z = (need / B.sum(1))[fpart]
    if z_start is not None:
        z = 0.9 * np.asarray(z_start, dtype=np.float64)[free_g] + 0.1 * z  # strictly inside, sums kept
    if D_start is not None:
        D = 0.95 * np.asarray(D_start, dtype=np.float64)[rows[n1:]] / sH
        try:
            A0 = HR.copy()
            A0[n1:, n1:] -= np.diag(D)
            np.linalg.cholesky(A0)
        except np.linalg.LinAlgError:
            D_start = None
    if D_start is None:
        # interior start: half the max-trace diagonal of the free rows (feasible: dropping
        # D on fixed-in rows only loosens H - D >= 0)
        D = 0.5 * max_trace_diagonal_newton(HR, gap=1e-3, deadline=deadline)[n1:]
    D = np.maximum(D, 1e-6 * lam / sH)

    def base(z, D):
        """The mu-independent pieces at (z, D); raises LinAlgError outside the feasible set."""
        e = 1.0 / z - 1.0
        erow = e[grp]
        M = HR.copy()
        M[free_diag] += D * erow
        K = _spd_inverse(M)
        W = K @ FR
        Wf = W[n1:]
        a = 0.5 * np.einsum("ij,ij->i", Wf, Wf)
        Pi = K[n1:, n1:] * (Wf @ Wf.T)
        M = HR.copy()
        M[free_diag] -= D
        Ainv = _spd_inverse(M)[n1:, n1:]
        # d u_i / d z_g: a diagonal (a vector) when every free group is one row in order
        Jz = -D / z**2 if singletons else -(D[:, None] * E) / (z**2)[None, :]
        return {"z": z, "D": D, "e": e, "erow": erow, "a": a, "Pi": Pi, "Ainv": Ainv, "Jz": Jz,
                "gz0": Jz * a if singletons else Jz.T @ a, "gD0": a * erow, "dAinv": np.diag(Ainv).copy()}

    def gradients(b, mu):
        z, D = b["z"], b["D"]
        gz = b["gz0"] - mu * (1.0 / z - 1.0 / (1.0 - z))
        gD = b["gD0"] - mu * b["dAinv"] + mu / D
        return gz, gD

    def residual(gz, gD):
        gzp = gz - B.T @ ((B @ gz) / B.sum(1))
        return math.sqrt(float(gzp @ gzp + gD @ gD))

    mu = mu_start
    n = pf + nf
    m = labels.size
    cur = base(z, D)
    while True:
        for _ in range(max_steps):
            if deadline is not None and time.perf_counter() > deadline:
                info["stopped"] = "deadline"
                return _expand_diagonal(D * sH, rows, n1, d, lam), info
            gz, gD = gradients(cur, mu)
            r0 = residual(gz, gD)
            a, Pi, Jz, erow, Ainv = cur["a"], cur["Pi"], cur["Jz"], cur["erow"], cur["Ainv"]
            KKT = np.zeros((n + m, n + m))
            zdiag = 2.0 / z**3 * (a * D if singletons else E.T @ (a * D)) + mu * (1.0 / z**2 + 1.0 / (1.0 - z) ** 2)
            if singletons:
                JPi = Jz[:, None] * Pi
                KKT[:pf, :pf] = -(JPi * Jz[None, :])
                KKT[:pf, pf:n] = -(JPi * erow[None, :])
                KKT[np.arange(pf), pf + np.arange(pf)] -= a / z**2
            else:
                JPi = Jz.T @ Pi
                KKT[:pf, :pf] = -(JPi @ Jz)
                KKT[:pf, pf:n] = -(JPi * erow[None, :]) - (E * a[:, None]).T / (z**2)[:, None]
            KKT[np.arange(pf), np.arange(pf)] += zdiag
            KKT[pf:n, :pf] = KKT[:pf, pf:n].T
            KKT[pf:n, pf:n] = -(erow[:, None] * Pi * erow[None, :]) - mu * (Ainv * Ainv)
            KKT[np.arange(pf, n), np.arange(pf, n)] -= mu / D**2
            KKT[:pf, n:] = B.T
            KKT[n:, :pf] = B
            # symmetric indefinite (Bunch-Kaufman): half the work of LU
            _, _, step, bad = scipy.linalg.lapack.dsysv(KKT, -np.concatenate([gz, gD, np.zeros(m)]), lower=1)
            if bad != 0:
                info["stopped"] = "singular KKT"
                return _expand_diagonal(D * sH, rows, n1, d, lam), info
            dz, dD = step[:pf], step[pf:n]
            with np.errstate(divide="ignore", invalid="ignore"):
                lim = np.concatenate([np.where(dz < 0, -z / dz, np.inf), np.where(dz > 0, (1 - z) / dz, np.inf),
                                      np.where(dD < 0, -D / dD, np.inf)])
            t = min(1.0, 0.95 * float(np.min(lim)))
            trial = None
            if psd_step > 0:
                # a quick step: psd_step of the way to the boundary of H - Diag(D) > 0, where
                # 1 / t = lambda_max(R' Diag(dD) R) with Ainv = RR', accepted without the residual test
                R, ok = scipy.linalg.lapack.dpotrf(Ainv, lower=1, clean=1)
                if ok == 0 and np.any(dD > 0):
                    top = scipy.linalg.eigvalsh(R.T @ (dD[:, None] * R), subset_by_index=[nf - 1, nf - 1],
                                                check_finite=False)[0]
                    if top > 0:
                        t = min(t, psd_step / float(top))
                try:
                    trial = base(z + t * dz, D + t * dD)
                    t = 0.0
                except np.linalg.LinAlgError:  # rounding at the boundary: fall back to the line search
                    pass
            while t > 1e-10:
                try:
                    cand = base(z + t * dz, D + t * dD)
                    if residual(*gradients(cand, mu)) <= (1 - 0.01 * t) * r0:
                        trial = cand
                        break
                except np.linalg.LinAlgError:  # left the feasible set: shorter step
                    pass
                t *= 0.5
            info["newton_steps"] += 1
            if trial is None:
                break
            cur, z, D = trial, trial["z"], trial["D"]
            if residual(*gradients(cur, mu)) < 1e-10:
                break
        if mu <= mu_final:
            break
        mu *= 0.1
    info["mu"] = mu
    return _expand_diagonal(D * sH, rows, n1, d, lam), info


def _spd_inverse(X: np.ndarray) -> np.ndarray:
    """X^-1 of a symmetric positive definite X by LAPACK (potrf, potri); LinAlgError if X is not PD."""
    L, info = scipy.linalg.lapack.dpotrf(X, lower=1, clean=1)  # clean: the strict upper triangle is 0
    if info != 0:
        raise np.linalg.LinAlgError("not positive definite")
    Xinv, info = scipy.linalg.lapack.dpotri(L, lower=1, overwrite_c=1)  # fills the lower triangle only
    if info != 0:
        raise np.linalg.LinAlgError("inverse failed")
    out = Xinv + Xinv.T
    out[np.diag_indices_from(out)] *= 0.5
    return out


def _expand_diagonal(D_free: np.ndarray, rows: np.ndarray, n1: int, d: int, lam: float) -> np.ndarray:
    """Full-length diagonal: the solved entries on free rows, a small value elsewhere."""
    out = np.full(d, 1e-3 * lam)
    out[rows[n1:]] = D_free
    return out


def optimal_split(instance: Instance, F: np.ndarray | None = None, deadline: float | None = None,
                  start: str | None = None) -> PerspectiveSplit:
    """The bound-maximizing diagonal split of `instance` (see `optimal_diagonal`), validated.

    start="conditional" starts the Newton method from the conditional split
    instead of an interior point of the max-trace problem: on full layers,
    where the method needs minutes to converge, a deadline then stops it at a
    diagonal at least as good as the conditional one in practice (any
    diagonal it stops at is validated before use).
    """
    t0 = time.perf_counter()
    F = output_factor(instance) if F is None else F
    parts, budget = parts_and_budget(instance)
    D_start = None
    if start == "conditional":
        D_start = conditional_split(instance.H).D
    elif start is not None:
        raise SolverError(f"unknown start {start!r} for the optimal split: use None or 'conditional'")
    D, info = optimal_diagonal(instance.H, F, instance.groups, parts, budget, deadline=deadline, D_start=D_start)
    info["start"] = start or "max-trace interior"
    return validate_split(instance.H, D, "optimal", time.perf_counter() - t0, info=info)


# --------------------------------------------------------------------- cache
_CACHE: OrderedDict[tuple, PerspectiveSplit] = OrderedDict()
_CACHE_SIZE = 32


def split_for(instance: Instance, method: str = "optimal", block: bool = False, backend: str = "cvxpy",
              F: np.ndarray | None = None, deadline: float | None = None, cache: bool = True,
              start: str | None = None) -> PerspectiveSplit:
    """The validated split of `instance` by `method`, cached in memory by content.

    method: "optimal" (depends on H, F, groups and the budgets), "max-trace"
    (H and groups; block-diagonal with block=True), "lambda-min" or
    "conditional" (H only).
    """
    if method not in SPLIT_METHODS:
        raise SolverError(f"unknown split {method!r}: choose one of {', '.join(SPLIT_METHODS)}")
    if method == "optimal":
        parts, budget = parts_and_budget(instance)
        key = (method, start, _fingerprint(instance.H, instance.W, instance.groups, parts, budget))
    elif method == "max-trace":
        key = (method, block, backend, _fingerprint(instance.H, instance.groups))
    else:  # lambda-min, conditional: H only
        key = (method, _fingerprint(instance.H))
    if cache and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    if method == "optimal":
        split = optimal_split(instance, F, deadline, start)
    elif method == "max-trace":
        limit = None if deadline is None else max(1.0, deadline - time.perf_counter())
        split = max_trace_split(instance.H, instance.groups, block=block, backend=backend, time_limit=limit)
    elif method == "conditional":
        split = conditional_split(instance.H)
    else:
        split = lambda_min_split(instance.H)
    if cache and not (split.info.get("stopped") == "deadline"):
        _CACHE[key] = split
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return split


def clear_split_cache() -> None:
    _CACHE.clear()


# ---------------------------------------------------------- relaxation (numpy)
def best_selection(q: np.ndarray, parts: np.ndarray, budget: np.ndarray, fixed_in: np.ndarray | None = None,
                   fixed_out: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """max sum_{g in S} q_g over feasible supports S (fixings respected) and one maximizer."""
    p = q.size
    fixed_in = np.zeros(p, bool) if fixed_in is None else fixed_in
    fixed_out = np.zeros(p, bool) if fixed_out is None else fixed_out
    chosen = fixed_in.copy()
    for j in range(budget.size):
        free = np.flatnonzero((parts == j) & ~fixed_in & ~fixed_out)
        need = int(budget[j]) - int(np.sum((parts == j) & fixed_in))
        if need < 0 or need > free.size:
            return -math.inf, chosen  # infeasible fixings
        if need:
            chosen[free[np.argsort(-q[free], kind="stable")[:need]]] = True
    return float(np.sum(q[chosen])), chosen


class PerspectiveModel:
    """The perspective relaxation of one instance for a validated split (numpy, fp64).

    Holds A = H - D, the group blocks of D and their inverses, and evaluates
    c(z) with its gradient (`value`) and the Fenchel lower bound of any W
    (`bound`). Used by the relax and highs-oa solvers.
    """

    def __init__(self, instance: Instance, F: np.ndarray, split: PerspectiveSplit):
        self.instance = instance
        self.F = F
        self.split = split
        self.Dm = split.dense()
        self.A = instance.H - self.Dm
        self.groups = instance.groups
        self.p = instance.n_groups
        self.parts, self.budget = parts_and_budget(instance)
        if split.is_diagonal:
            self.Dinv = np.diag(1.0 / split.D)
        else:
            Dinv = np.zeros_like(self.Dm)
            for rows in instance.group_rows:
                Dinv[np.ix_(rows, rows)] = np.linalg.inv(self.Dm[np.ix_(rows, rows)])
            self.Dinv = 0.5 * (Dinv + Dinv.T)

    def q_of(self, V: np.ndarray) -> np.ndarray:
        """q_g = tr(V_g' D_g^-1 V_g) for every group."""
        rowwise = np.sum(V * (self.Dinv @ V), 1)
        return np.bincount(self.groups, weights=rowwise, minlength=self.p)

    def value(self, z: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """c(z), its gradient -0.5 q and the minimizing W, for z in [0, 1]^p.

        c(z) = -0.5 tr((sF)' M^-1 (sF)), M = S A S + D, s_i = sqrt(z_g(i)),
        W = S M^-1 S F (well defined at z_g = 0, where W_g = 0).
        """
        s = np.sqrt(np.clip(z, 0.0, 1.0))[self.groups]
        M = s[:, None] * self.A * s[None, :] + self.Dm
        cf = scipy.linalg.cho_factor(M, lower=True, check_finite=False)
        sF = s[:, None] * self.F
        Y = scipy.linalg.cho_solve(cf, sF, check_finite=False)
        W = s[:, None] * Y
        c = -0.5 * float(np.einsum("ij,ij->", sF, Y))
        q = self.q_of(self.F - self.A @ W)
        return c, -0.5 * q, W

    def bound(self, W: np.ndarray, fixed_in=None, fixed_out=None) -> tuple[float, np.ndarray]:
        """The Fenchel lower bound -0.5 tr(W'AW) - 0.5 max_S sum_{g in S} q_g and q (valid for any W)."""
        AW = self.A @ W
        q = self.q_of(self.F - AW)
        top, _ = best_selection(q, self.parts, self.budget, fixed_in, fixed_out)
        return -0.5 * float(np.einsum("ij,ij->", W, AW)) - 0.5 * top, q
