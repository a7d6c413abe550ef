"""Branch and bound on the complement-form Shor relaxation (`shor-bnb`).

Removing the groups A (their rows R(A); a budget of removals per part) of
W_hat and refitting the rest costs

    f(S) - f(all) = 0.5 tr(W_R' (K_RR)^-1 W_R),   K = H^-1, R = R(A)

(the Schur complement of H_SS in H is (K_RR)^-1). With W_hat W_hat' = L L'
this is 0.5 tr(L_R' (K_RR)^-1 L_R) = max_T [tr(T_R' L_R) - 0.5 tr(T_R' K_RR
T_R)], so for the group removal indicator a in {0, 1}^p and every T (d x d),

    f(S) - f(all) >= c'a - 0.5 a'Ba,   c_g = sum of rowdot(L, T) over the
                                       rows of g, B = E'(K o TT')E     (1)

(E: rows x groups membership). As a'Diag(delta)a = delta'a on {0, 1}^p,
every delta with Q = Diag(delta) - B positive definite makes the convex
q(a) = (c - delta / 2)'a + 0.5 a'Qa a lower bound of (1) there; over the
box lo <= a <= hi with a removal budget r_j per part j, q is bounded below
by the Lagrangian dual value

    F = -0.5 b'Q^-1 b + sum_j nu_j r_j + l'lo - h'hi,
    b = c - delta / 2 - nu_part - l + h,   l, h >= 0.                  (2)

So F is a valid lower bound on the removal cost for every T and every
(delta, nu, l, h) with Q positive definite and l, h >= 0, computed in fp64
with one Cholesky factorization: no solver accuracy enters. Maximizing (2)
over (delta, nu, l, h) for a fixed T is the Shor relaxation of (1); over T
as well it is the Shor relaxation of the complement form, with P = aa'
lifted: min 0.5 tr(L'D_a (K o P)^-1 D_a L) over [[1, a'], [a, P]] PSD,
diag(P) = a (rows of a group sharing its a).

On real layers this is far tighter than the diagonal perspective relaxation
of the original form (`bnb`): on the 30-, 60- and 100-neuron crops of
SmolLM2 layer 10 it leaves 0.03%, 0.6% and 0.8% of err at the root, where
the perspective relaxation with the bound-maximizing diagonal leaves 2.2%,
6.9% and 8.5%.

At each node (groups fixed removed or kept):
* T: at the root from the restricted primal P = aa' + Diag(a - a^2), where
  the relaxation reads phi(a) = 0.5 tr(L' (K + blockdiag_g(K_gg (1/a_g -
  1)))^-1 L): its minimizer over the box (projected gradient) gives T =
  D_a^-1 (K + ...)^-1 L, a few tenths of a percent from the best T. T then
  climbs: it moves towards (K o P)^-1 D_a L, with (a, P) the lifted point of
  the dual's central path (P = aa' + 2 mu Q^-1), as long as the bound rises,
  up to 4 times at the root (on the SmolLM2 layer-10 crops this takes the
  root gap from 0.58% to 0.39% on 60 neurons and from 0.75% to 0.51% on
  100). The lifted point is the central point that the descent passed, so a
  climb costs one descent per trial;
* every other node inherits its parent's climbed T, which bounds it at least
  as well as the parent (the same T over a smaller box), and climbs once
  from there: a quarter of the way to T*, else a tenth (half the way raises
  the bound at one node in six). One descent to bound the node, one to
  climb: inheriting replaces the node's own restricted primal and the
  descent that compared its T with the parent's (`inherit_T`; SmolLM2 layer
  10's 100-neuron crop is proven in 19 s instead of 30 s, and layer 5's gap
  after 5 minutes on one thread falls from 0.21% to 0.15%). The open nodes
  hold their parent's T in fp32, shared by siblings, within `parent_T_mb`;
  a node without one (or with inherit_T off) takes the restricted primal's
  T, warm-started from its parent's a, and retries the parent's T where its
  own bounds it below the parent;
* (delta, nu, l, h) by a log-barrier Newton method on (2) over the free
  groups (groups fixed kept drop out, groups fixed removed enter (1)
  exactly), 60 steps from the parent's delta moved off the boundary of the
  dual (`ShorDual.warm`: 1.65x the nodes in 5 minutes on SmolLM2 layer 5's
  100-neuron crop, SmolLM2 layer 10's proven in 30 s instead of 42 s);
  from 50 free groups on, each step solves n x n systems
  (`ShorDual._direction`) rather than one of 3n + J unknowns, which makes
  the root bound of a full 1536-neuron layer affordable (under a time
  limit the root's restricted primal takes at most `primal_share` of it);
* l_g and h_g are what forcing g removed or kept adds to the bound, so a
  group whose child bound reaches the incumbent is fixed the other way;
* the incumbent: the largest a of every part removed (rounding), OSSCAR's
  support at the root;
* probing, once the tree has proved large (`probe_from` times the cost of a
  round, two node bounds per free group of the root): both children of every
  free group of the root box are bounded with the root's T; a child whose
  bound reaches the incumbent fixes its group the other way for every support
  better than the incumbent, which the open nodes take on as they are popped
  (on SmolLM2 layer 5's 100-neuron crop it fixes 15 groups kept);
* `workers` > 1: worker processes bound the nodes, `workers` at a time, while
  this process keeps the tree, the incumbent and the bound (best-first, the
  nodes in flight aside); the nodes explored best-first are those with a
  bound below the optimum, so the tree is the serial one, in about half the
  time on two cores.
Best-first search, branching on the most fractional a.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from osscar_opt.instance import Instance
from osscar_opt.registry import Result, Solver, Status, register

from ._common import (
    GAP_TOL,
    Trace,
    cpu_threads,
    osscar_support,
    parts_and_budget,
    restricted_osscar,
    worker_pool,
)
from .relaxation import project_capped

# LAPACK directly: the dual's matrices are small and solved thousands of times per second,
# so the checks of the scipy.linalg wrappers would cost more than the factorizations
_potrf, _potrs, _potri = scipy.linalg.lapack.dpotrf, scipy.linalg.lapack.dpotrs, scipy.linalg.lapack.dpotri


# from this many free groups on, Newton steps solve n x n systems instead of one of 3n + J
REDUCE_FROM = 50
# the box multipliers' start, relative to the dual's scale
START_BOX = 1e-4
# a warm start's margin above the dual's boundary (Q's smallest eigenvalue), relative to its scale
WARM_SHIFT = 0.3
# the fractions of the way to T* that the ascent on T tries, in turn, at the root and at other nodes
ROOT_T_TRIALS = (0.5, 0.25, 0.1)
NODE_T_TRIALS = (0.25, 0.1)


def _inverse(cf: np.ndarray) -> np.ndarray:
    """The symmetric inverse from a lower Cholesky factor."""
    inv, _ = _potri(cf, lower=1)
    inv = np.tril(inv)
    inv += inv.T
    inv.flat[:: inv.shape[0] + 1] *= 0.5
    return inv


class ComplementForm:
    """An instance in the complement form: K = H^-1, L (LL' = W_hat W_hat'),
    the rows' groups, and the removal budget of every part."""

    def __init__(self, instance: Instance):
        H, W = instance.H, instance.W
        self.instance = instance
        cf = scipy.linalg.cho_factor(H)
        K = scipy.linalg.cho_solve(cf, np.eye(H.shape[0]))
        self.K = 0.5 * (K + K.T)
        lam, U = np.linalg.eigh(W @ W.T)
        self.L = U * np.sqrt(np.clip(lam, 0.0, None))
        self.gid = np.asarray(instance.groups, dtype=np.int64)  # group of every row
        self.p = instance.n_groups
        self.parts, keep_budget = parts_and_budget(instance)
        self.remove = np.bincount(self.parts, minlength=keep_budget.size) - keep_budget
        self.kdiag_block = self.gid[:, None] == self.gid[None, :]  # rows of one group

    def cost(self, removed: np.ndarray) -> float:
        """f(S) - f(all) with the groups `removed` (a boolean mask) taken out."""
        rows = np.flatnonzero(removed[self.gid])
        if rows.size == 0:
            return 0.0
        cf = scipy.linalg.cho_factor(self.K[np.ix_(rows, rows)])
        return 0.5 * float(np.einsum("ij,ij->", self.L[rows], scipy.linalg.cho_solve(cf, self.L[rows])))

    def project(self, y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Projection onto the node's box {lo <= a <= hi, sum over part j = remove_j}."""
        a = lo.astype(np.float64).copy()
        for j in range(self.remove.size):
            mem = np.flatnonzero((self.parts == j) & (lo < hi))
            if mem.size:
                a[mem] = project_capped(y[mem], float(self.remove[j] - lo[self.parts == j].sum()))
        return a

    def restricted_primal(self, lo: np.ndarray, hi: np.ndarray, a0: np.ndarray | None = None, iters: int = 100,
                          floor: float = 1e-6, deadline: float | None = None):
        """Minimize phi over the node's box (projected gradient with backtracking).
        Returns (a, phi, T) with T zero on the rows of groups kept."""
        on_g = hi > 0
        rows = np.flatnonzero(on_g[self.gid])
        g_rows = self.gid[rows]
        K_on, L_on = self.K[np.ix_(rows, rows)], self.L[rows]
        block = K_on * self.kdiag_block[np.ix_(rows, rows)]

        def evaluate(a):
            E = K_on + block * (1.0 / a[g_rows] - 1.0)[:, None]
            cf, info = _potrf(E, lower=1, clean=1, overwrite_a=1)
            if info != 0:
                raise np.linalg.LinAlgError("the restricted primal's matrix is not positive definite")
            TE, _ = _potrs(cf, L_on, lower=1)
            per_row = np.einsum("ij,ij->i", block @ TE, TE)
            grad = np.zeros(self.p)
            np.add.at(grad, g_rows, per_row)
            grad = np.where(on_g, 0.5 * grad / np.maximum(a, floor) ** 2, 0.0)
            return 0.5 * float(np.einsum("ij,ij->", L_on, TE)), grad, TE

        def clip(a):
            return np.where(on_g, np.maximum(a, floor), 0.0)

        start = np.full(self.p, 0.5) if a0 is None else a0
        a = clip(self.project(start, lo, hi))
        f, g, TE = evaluate(a)
        step = 0.1 / max(float(np.abs(g).max()), 1e-300)
        for _ in range(iters):
            if deadline is not None and time.perf_counter() > deadline:
                break
            while True:
                an = clip(self.project(a - step * g, lo, hi))
                fn, gn, TEn = evaluate(an)
                if fn <= f - 1e-4 * float(g @ (a - an)) or step < 1e-300:
                    break
                step *= 0.5
            done = f - fn <= 1e-12 * abs(f)
            a, f, g, TE = an, fn, gn, TEn
            if done:
                break
            step *= 1.5
        T = np.zeros_like(self.L)
        T[rows] = TE / a[g_rows][:, None]
        return a, f, T


class ShorDual:
    """The dual (2) of one node for one T over its free groups: `value` is a
    valid lower bound at every admissible point u = (delta, nu, l, h)."""

    iterations = 0  # Newton steps taken in this process (the search's work counter)

    def __init__(self, c: np.ndarray, B: np.ndarray, parts: np.ndarray, r: np.ndarray, const: float = 0.0):
        self.n, self.J = c.size, r.size
        self.c, self.B, self.parts, self.r, self.const = c, B, parts, r.astype(np.float64), const
        self.scale = max(float(np.abs(np.diag(B)).max()), 1e-300)
        # the slices of u
        n, J = self.n, self.J
        self.s_delta, self.s_nu = slice(0, n), slice(n, n + J)
        self.s_l, self.s_h = slice(n + J, 2 * n + J), slice(2 * n + J, 3 * n + J)
        self.size = 3 * n + J
        self.reduce_from = REDUCE_FROM
        self.central = None  # set by newton()

    @classmethod
    def at_node(cls, form: ComplementForm, T: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        """(dual, free groups): groups fixed kept drop out of (1), groups fixed removed
        enter it exactly (a_g^2 = a_g) as constants. Every part must have 0 < need < free."""
        free = np.flatnonzero(lo < hi)
        ones = np.flatnonzero(lo > 0)
        c_rows = np.einsum("ij,ij->i", form.L, T)
        c = np.bincount(form.gid, weights=c_rows, minlength=form.p)
        # B = E'(K o TT')E on the groups involved
        involved = np.concatenate([free, ones])
        rows = np.flatnonzero(np.isin(form.gid, involved))
        Brows = form.K[np.ix_(rows, rows)] * (T[rows] @ T[rows].T)
        member = (form.gid[rows][:, None] == involved[None, :]).astype(np.float64)
        Bg = member.T @ Brows @ member
        nf = free.size
        B_FF, B_FO, B_OO = Bg[:nf, :nf], Bg[:nf, nf:], Bg[nf:, nf:]
        const = float(c[ones].sum()) - 0.5 * float(B_OO.sum())
        parts_free = form.parts[free]
        need = form.remove - np.bincount(form.parts[ones], minlength=form.remove.size)
        used = np.unique(parts_free)
        remap = np.full(form.remove.size, -1)
        remap[used] = np.arange(used.size)
        return cls(c[free] - B_FO.sum(1), B_FF, remap[parts_free], need[used], const), free

    def start(self) -> np.ndarray:
        """delta = 1.05 t diag(B) with t the largest eigenvalue of the Jacobi-scaled B (Q positive
        definite), small box multipliers."""
        n = self.n
        d = np.sqrt(np.maximum(np.diag(self.B), 1e-12 * self.scale))
        t = float(scipy.linalg.eigvalsh(self.B / d[:, None] / d[None, :], subset_by_index=[n - 1, n - 1])[0])
        return self._with_delta(max(1.05 * t, 0.0) * d * d + 1e-6 * self.scale)

    def _with_delta(self, delta: np.ndarray) -> np.ndarray:
        u = np.zeros(self.size)
        u[self.s_delta] = delta
        u[self.s_l] = START_BOX * self.scale
        u[self.s_h] = START_BOX * self.scale
        return u

    def warm(self, delta: np.ndarray) -> np.ndarray:
        """A start from another node's delta, shifted so that Q's smallest eigenvalue is at
        least WARM_SHIFT times the dual's scale. The other node's delta is near that node's optimum,
        where Q is nearly singular; a start that close to the boundary of log det Q took about
        50 of the 100 Newton steps to centre for the first mu (of the dual points met in the first
        30 s on SmolLM2 layer 5's 100-neuron crop, one in ten was left more than 0.4% below its
        maximum after 100 steps). With the margin, 60 steps leave one in ten 5e-5 below it."""
        lmin = float(scipy.linalg.eigvalsh(np.diag(delta) - self.B, subset_by_index=[0, 0])[0])
        return self._with_delta(delta + max(0.0, -lmin) + WARM_SHIFT * self.scale)

    def value(self, u: np.ndarray):
        """(F, y, Cholesky factor of Q) at u, or None where u is not admissible."""
        delta, nu, lm, hm = u[self.s_delta], u[self.s_nu], u[self.s_l], u[self.s_h]
        if lm.min(initial=0.0) < 0 or hm.min(initial=0.0) < 0:
            return None
        Q = -self.B
        Q.flat[:: self.n + 1] += delta
        cf, info = _potrf(Q, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            return None
        b = self.c - 0.5 * delta - nu[self.parts] - lm + hm
        y, _ = _potrs(cf, b, lower=1)
        F = self.const - 0.5 * float(b @ y) + float(nu @ self.r) - float(hm.sum())
        return F, y, cf

    def newton(self, u: np.ndarray, mu: float, mu_final: float, steps: int, prune_at: float = math.inf,
               deadline: float | None = None, progress=None, keep_mu: float = 0.0):
        """Log-barrier Newton steps on (2) + mu (log det Q + sum log l + sum log h),
        mu shrinking 5x at a time down to mu_final. Returns the iterate with the largest F: (u, its
        F, its primal estimate a); F + l_g and F + h_g bound the children only at that same u.
        progress(F) is called whenever the best F rises. The first iterate centred for a mu at or
        below keep_mu is kept as self.central = (u, mu) (None if none was)."""
        n, J = self.n, self.J
        self.central = None
        ev = self.value(u)
        if ev is None:
            u = self.start()
            ev = self.value(u)
        best_F, best_a, best_u = -math.inf, None, u
        part_cols = np.zeros((n, J))
        part_cols[np.arange(n), self.parts] = 1.0
        lh = np.arange(n + J, self.size)
        for _ in range(steps):
            F, y, cf = ev
            if F > best_F:
                best_F, best_a, best_u = F, -y, u
                if progress is not None:
                    progress(F)
            if best_F >= prune_at or (deadline is not None and time.perf_counter() > deadline):
                break
            lm, hm = u[self.s_l], u[self.s_h]
            Qi = _inverse(cf)
            g = np.empty(self.size)
            g[self.s_delta] = 0.5 * y + 0.5 * y * y + mu * np.diag(Qi)
            g[self.s_nu] = part_cols.T @ y + self.r
            g[self.s_l] = y + mu / lm
            g[self.s_h] = -y - 1.0 + mu / hm
            ShorDual.iterations += 1
            step = self._direction(Qi, y, u, mu, g, part_cols) if n >= self.reduce_from else \
                self._direction_dense(Qi, y, u, mu, g, part_cols)
            if step is None:
                break
            dec = float(g @ step)
            t = 1.0
            neg = step[lh] < 0
            if np.any(neg):
                t = min(1.0, 0.99 * float(np.min(-u[lh][neg] / step[lh][neg])))

            def barrier(v, e):
                return e[0] + mu * (2.0 * float(np.sum(np.log(np.diag(e[2])))) + float(np.sum(np.log(v[lh]))))

            current = barrier(u, ev)
            new = None
            while t > 1e-10:
                e = self.value(u + t * step)
                if e is not None and barrier(u + t * step, e) >= current + 1e-4 * t * dec:
                    new = e
                    break
                t *= 0.5
            if new is None:
                if mu > mu_final:
                    mu = max(mu * 0.2, mu_final)
                    continue
                break
            u, ev = u + t * step, new
            if dec < 1e-3 * mu:
                if self.central is None and mu <= keep_mu:
                    self.central = (u, mu)
                if mu <= mu_final:
                    break
                mu = max(mu * 0.2, mu_final)
        F, y, _ = ev
        if F > best_F:
            best_F, best_a, best_u = F, -y, u
        self.final = (u, mu)  # the last iterate, on the central path of mu when converged
        return best_u, best_F, best_a

    def descend(self, u: np.ndarray, steps: int, prune_at: float, deadline: float | None, mu_T: float,
                progress=None):
        """newton() with the nodes' schedule: mu from 1e-2 down to 1e-10 of the dual's scale, the
        central point near mu_T (relative to the scale) kept for the ascent on T."""
        return self.newton(u, 1e-2 * self.scale, 1e-10 * self.scale, steps, prune_at=prune_at, deadline=deadline,
                           progress=progress, keep_mu=mu_T * self.scale)

    @classmethod
    def descend_at_node(cls, form: "ComplementForm", T: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                        delta: np.ndarray, steps: int, prune_at: float, deadline: float | None, mu_T: float,
                        delta_free: np.ndarray | None = None):
        """The node's dual for T, descended from delta: the same node's, or another node's
        over the groups delta_free (a superset of this node's free groups): (dual, u, F, a)."""
        dual, free = cls.at_node(form, T, lo, hi)
        if delta_free is not None:
            delta = _restrict(delta, delta_free, free)
        return (dual, *dual.descend(dual.warm(delta), steps, prune_at, deadline, mu_T))

    def _direction_dense(self, Qi, y, u, mu, g, part_cols):
        """The Newton step: minus the Hessian is M'Q^-1 M + barrier terms, M = d(b - Q y)/du =
        [-D, -parts, -I, I] with D = diag(1/2 + y), assembled block by block (O(n^2) rather than a
        dense product) and factorized whole (3n + J unknowns)."""
        n, J = self.n, self.J
        sd, sn, sl, sh = self.s_delta, self.s_nu, self.s_l, self.s_h
        Dy = 0.5 + y
        QiD = Qi * Dy
        QiP = Qi @ part_cols
        Hn = np.empty((self.size, self.size))
        Hn[sd, sd] = Dy[:, None] * QiD + mu * Qi * Qi
        Hn[sd, sn] = Dy[:, None] * QiP
        Hn[sd, sl] = QiD.T
        Hn[sd, sh] = -QiD.T
        Hn[sn, sn] = part_cols.T @ QiP
        Hn[sn, sl] = QiP.T
        Hn[sn, sh] = -QiP.T
        Hn[sl, sl] = Qi
        Hn[sl, sh] = -Qi
        Hn[sh, sh] = Qi
        for upper in ((sd, sn), (sd, sl), (sd, sh), (sn, sl), (sn, sh), (sl, sh)):
            Hn[upper[::-1]] = Hn[upper].T
        lh = np.arange(n + J, self.size)
        Hn[lh, lh] += mu / u[lh] ** 2
        Hn.flat[:: self.size + 1] += 1e-13 * np.trace(Hn) / self.size
        chol, info = _potrf(Hn, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            return None
        step, _ = _potrs(chol, g, lower=1)
        return step

    def _direction(self, Qi, y, u, mu, g, part_cols):
        """The same Newton step from n x n systems only. With N the barrier part (mu Q^-1 o Q^-1
        on delta, mu / l^2 and mu / h^2 on the box multipliers, none on nu) and w = Q^-1 M x, the
        system (N + M'Q^-1 M) x = g reads N x + M'w = g, M x = Q w; eliminating x leaves
        (Q + D A^-1 D + Diag((l^2 + h^2) / mu)) w + parts x_nu = rhs, parts'w = -g_nu with
        A = mu Q^-1 o Q^-1: two n x n factorizations and an inverse instead of one of 3n + J
        (about 7x fewer flops: 0.48 s instead of 1.67 s on a full layer's 1536 groups, one thread)."""
        gd, gn, gl, gh = g[self.s_delta], g[self.s_nu], g[self.s_l], g[self.s_h]
        lm, hm = u[self.s_l], u[self.s_h]
        Dy = 0.5 + y
        A = mu * Qi * Qi
        A.flat[:: self.n + 1] += 1e-13 * np.trace(A) / self.n
        cA, info = _potrf(A, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            return None
        Ai = _inverse(cA)
        wl, wh = lm * lm / mu, hm * hm / mu
        S = Ai * Dy[:, None] * Dy[None, :] - self.B
        S.flat[:: self.n + 1] += u[self.s_delta] + wl + wh
        cS, info = _potrf(S, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            return None
        rhs = -Dy * (Ai @ gd) - wl * gl + wh * gh
        z0, _ = _potrs(cS, rhs, lower=1)
        Z, _ = _potrs(cS, part_cols, lower=1)
        x_nu = np.linalg.solve(part_cols.T @ Z, part_cols.T @ z0 + gn)
        w = z0 - Z @ x_nu
        step = np.empty(self.size)
        step[self.s_delta] = Ai @ (gd + Dy * w)
        step[self.s_nu] = x_nu
        step[self.s_l] = wl * (gl + w)
        step[self.s_h] = wh * (gh - w)
        return step

    def lifted_point(self, u: np.ndarray, mu: float, steps: int, deadline: float | None = None):
        """(a, P) on the central path of mu from u: a = -y and P = aa' + 2 mu Q^-1 (diag(P) = a
        there), the primal point of the relaxation that this dual point prices; None if not reached."""
        self.newton(u, mu, mu, steps, deadline=deadline)
        return self.priced_point(*self.final)

    def priced_point(self, uc: np.ndarray, mu_c: float):
        """(a, P) of a point uc on the central path of mu_c (see lifted_point); None if uc is not
        admissible."""
        ev = self.value(uc)
        if ev is None:
            return None
        _, y, cf = ev
        Qi = _inverse(cf)
        a = np.clip(-y, 0.0, 1.0)
        P = np.outer(a, a) + 2.0 * mu_c * Qi
        P[np.diag_indices_from(P)] = a
        return a, P


@dataclass
class ShorBnbParams:
    """Parameters of `shor-bnb`.

    gap_tol: optimality tolerance in err units (relative to -f(all)).
    newton_steps: Newton steps on the dual (2) per node (four times as many at the root).
    primal_steps: projected-gradient steps of the restricted primal per node.
    max_nodes: stop after this many nodes (None: no limit).
    osscar_nodes: run OSSCAR restricted to the node's fixings at nodes
        2, 4, 8, ... up to this node count (0 disables).
    max_rows: skip instances with more rows than this (dense d x d algebra).
    threads: CPU threads for BLAS during the solve (None: leave the setting).
    root_T_steps: steps of the ascent on T at the root (0: T from the restricted primal only).
    node_T_steps: steps of the ascent on T at every other node, once the search has taken
        node_T_from nodes.
    mu_T: the barrier weight (relative to the dual's scale) of the central-path point whose
        lifted P gives the direction of the ascent on T.
    parent_T_mb: the memory (MiB) that the open nodes may use for their parent's T (fp32,
        d x d per parent), which they inherit (inherit_T) or try where their own T bounds them
        below their parent. Past this budget children get none (0 turns both off).
    inherit_T: nodes that climb (node_T_steps, past node_T_from) start from their parent's T
        instead of the restricted primal's: the restricted primal and the retry's descent are
        saved, and the climb adapts T to the node's box.
    primal_share: under a time limit, the largest share of the time left that the root's
        restricted primal may take (on full layers the root's Newton steps need the rest).
    probe_rounds: rounds of probing of the root box (0: none): both children of every free group
        are bounded; a child whose bound reaches the incumbent fixes its group the other way for
        the whole tree, and the root box is bounded again with the fixings before the next round.
    probe_from: probe once the search has bounded probe_from times as many nodes as a round costs
        (two per free group of the root): small trees end before, large ones pay for it.
    workers: processes bounding nodes (1: this process alone). The tree, the incumbent and the
        bound stay in this process; starting the workers takes about two seconds, during which
        this process searches alone.
    workers_after: seconds this process searches alone before the workers start (trees that end
        sooner do not pay for starting them).
    """

    gap_tol: float = GAP_TOL
    newton_steps: int = 60
    primal_steps: int = 100
    max_nodes: int | None = None
    osscar_nodes: int = 4096
    max_rows: int = 2048
    threads: int | None = 1
    root_T_steps: int = 4
    node_T_steps: int = 1
    node_T_from: int = 0
    mu_T: float = 1e-4
    parent_T_mb: float = 1024.0
    primal_share: float = 0.25
    inherit_T: bool = True
    probe_rounds: int = 1
    probe_from: float = 4.0
    workers: int = 1
    workers_after: float = 1.0

    def __post_init__(self):
        if not self.gap_tol >= 0:
            raise ValueError("gap_tol must be >= 0")
        if not self.parent_T_mb >= 0:
            raise ValueError("parent_T_mb must be >= 0")
        if not 0 < self.primal_share <= 1:
            raise ValueError("primal_share must be in (0, 1]")
        if int(self.probe_rounds) < 0 or not self.probe_from >= 0:
            raise ValueError("probe_rounds and probe_from must be >= 0")
        if int(self.workers) < 1 or not self.workers_after >= 0:
            raise ValueError("workers must be >= 1 and workers_after >= 0")
        if min(int(self.root_T_steps), int(self.node_T_steps), int(self.node_T_from)) < 0 or not self.mu_T > 0:
            raise ValueError("root_T_steps, node_T_steps and node_T_from must be >= 0, mu_T > 0")
        if int(self.newton_steps) < 1 or int(self.primal_steps) < 1:
            raise ValueError("newton_steps and primal_steps must be >= 1")
        if self.max_nodes is not None and int(self.max_nodes) < 1:
            raise ValueError("max_nodes must be >= 1")


class _Node:
    __slots__ = ("lb", "order", "lo", "hi", "a", "delta", "free", "T")

    def __init__(self, lb, order, lo, hi, a=None, delta=None, free=None, T=None):
        self.lb, self.order, self.lo, self.hi, self.a, self.delta, self.free = lb, order, lo, hi, a, delta, free
        self.T = T  # the parent's T (float32, shared by both children), or None

    def __lt__(self, other):
        return (self.lb, self.order) < (other.lb, other.order)


def _propagate(form: ComplementForm, lo: np.ndarray, hi: np.ndarray) -> bool:
    """Fix the free groups of parts with no choice left (in place); False if infeasible."""
    for j in range(form.remove.size):
        in_part = form.parts == j
        free = in_part & (lo < hi)
        need = int(form.remove[j]) - int(lo[in_part].sum())
        if need < 0 or need > int(free.sum()):
            return False
        if need == 0:
            hi[free] = 0
        elif need == int(free.sum()):
            lo[free] = 1
    return True


@register
class ShorBranchAndBound(Solver):
    name = "shor-bnb"
    exact = True
    requires = ()
    devices = ("cpu",)
    Params = ShorBnbParams
    description = "branch and bound on the complement-form Shor relaxation (dual bounds by Newton, CPU), workers=N processes"

    def skip(self, instance, params):
        if instance.d > params.max_rows:
            return True, f"{instance.d} rows exceed max_rows={params.max_rows}"
        return False, ""

    def prepare(self, instance, params, device):
        return ComplementForm(instance)

    def run(self, form, params, deadline):
        with cpu_threads(params.threads):
            return _search(form, params, deadline)


def _search(form: ComplementForm, params: ShorBnbParams, deadline: float | None) -> Result:
    return _Search(form, params, deadline).run()


@dataclass
class _Evaluation:
    """What the search keeps of a node's bound (computed here or in a worker process)."""

    F_u: float  # the bound that goes with the multipliers lm, hm
    lm: np.ndarray  # what forcing a free group removed / kept adds to F_u
    hm: np.ndarray
    delta: np.ndarray
    free_ids: np.ndarray
    a_primal: np.ndarray
    a_hat: np.ndarray  # the relaxation's a, fixings included
    T32: np.ndarray  # the node's final T (fp32) for its children
    candidate: np.ndarray  # the rounding of a_hat (a removal mask) and its cost
    cost: float
    counters: dict


def _evaluate(form: ComplementForm, params: ShorBnbParams, node: _Node, prune_at: float, deadline: float | None,
              T_steps: int, bounded=None) -> _Evaluation:
    """Bound one node (or take the root's bound_node() output `bounded`) and round its relaxation."""
    counters = {"parent_T_tried": 0, "parent_T_taken": 0, "T_inherited": 0, "newton_iterations": 0}
    if bounded is None:
        bounded = _bound_node(form, params, node, prune_at, deadline, False, T_steps, counters)
    F_u, u, dual, free_ids, a_primal, T, a_free = bounded
    a_hat = node.lo.astype(np.float64).copy()
    a_hat[free_ids] = np.clip(a_free, 0.0, 1.0)
    candidate = _round(form, a_hat, node.lo, node.hi)
    return _Evaluation(F_u, u[dual.s_l], u[dual.s_h], u[dual.s_delta], free_ids, a_primal, a_hat,
                       T.astype(np.float32), candidate, form.cost(candidate), counters)


_WORKER: dict = {}


def _worker_init(instance: Instance, params: ShorBnbParams) -> None:
    cpu_threads(1).__enter__()  # for the life of the worker: one thread each, as in the serial search
    _WORKER.update(form=ComplementForm(instance), params=params)


def _worker_evaluate(node: _Node, prune_at: float, deadline: float | None, T_steps: int) -> _Evaluation:
    return _evaluate(_WORKER["form"], _WORKER["params"], node, prune_at, deadline, T_steps)


class _Search:
    """Best-first search. The nodes are bounded here (workers = 1) or, `workers` at a time, in
    worker processes while this process keeps the tree: the open nodes, the incumbent and the
    bound. The search order is the serial one but for the nodes in flight."""

    def __init__(self, form: ComplementForm, params: ShorBnbParams, deadline: float | None):
        instance = form.instance
        self.form, self.params, self.deadline, self.instance = form, params, deadline, instance
        self.t_start = time.perf_counter()
        self.full = -instance.full_objective  # f(S) - f(all) = full * err
        self.tol = params.gap_tol * self.full
        best_S = osscar_support(instance, "cpu", deadline)
        self.removed = np.ones(form.p, bool)
        self.removed[best_S] = False
        self.UB = form.cost(self.removed)
        self.info = {"nodes": 0, "fixed_by_bound": 0, "osscar_runs": 0, "osscar_err": self.UB / self.full,
                     "root_err_bound": None, "parent_T_tried": 0, "parent_T_taken": 0, "T_inherited": 0,
                     "newton_iterations": 0, "probes": 0, "fixed_by_probing": 0}
        self.trace = Trace(instance.full_objective, t0=self.t_start)
        self.counter = itertools.count()
        self.heap: list = []
        self.in_flight: dict = {}  # future -> node
        self.T_bytes = params.parent_T_mb * 2**20
        self.pruned_min = math.inf
        self.timed_out = False
        self.osscar_at = 0  # the node count of the last OSSCAR run
        self.pool, self.ready = None, []  # the worker processes (workers > 1)
        self.root_node = self.root_bounded = None  # the root's box and bound_node() output, for probing
        self.fixed = None  # probing's fixings: (groups kept, groups removed, the bound they hold for)

    def offer(self, removed: np.ndarray, cost: float | None = None) -> None:
        cost = self.form.cost(removed) if cost is None else cost
        if cost < self.UB:
            self.UB, self.removed = cost, removed

    def close(self, bound: float) -> None:
        self.pruned_min = min(self.pruned_min, bound)

    def open_min(self) -> float:
        """The least bound of the open nodes: the heap's first (it is ordered by bound) or one in flight."""
        first = self.heap[0].lb if self.heap else math.inf
        return min(first, min((n.lb for n in self.in_flight.values()), default=math.inf))

    def next_node(self):
        """The next node to bound and its ascent steps on T, or None (tree done, time or node limit)."""
        params = self.params
        while self.heap:
            if self.deadline is not None and time.perf_counter() > self.deadline:
                self.timed_out = True
                return None
            if params.max_nodes is not None and self.info["nodes"] >= params.max_nodes:
                return None
            if self.root_bounded is not None and params.probe_rounds and \
                    self.info["nodes"] >= params.probe_from * 2 * self.root_bounded[3].size:
                self.probe_root()
            node = heapq.heappop(self.heap)
            if node.lb >= self.UB - self.tol:
                self.close(node.lb)
                continue
            if self.fixed is not None and not self.apply_fixed(node):
                continue
            self.info["nodes"] += 1
            if not (node.lo < node.hi).any():  # a leaf: its cost is exact
                cost = self.form.cost(node.lo > 0)
                self.offer(node.lo > 0, cost)
                self.close(cost)
                continue
            T_steps = params.node_T_steps if self.info["nodes"] > params.node_T_from else 0
            return node, T_steps
        return None

    def apply_fixed(self, node: _Node) -> bool:
        """Restrict the node's box by probing's fixings (in place); False (node closed) where the
        box holds no support that they admit."""
        keep, remove, bound = self.fixed
        if np.any(keep & (node.lo > 0)) or np.any(remove & (node.hi == 0)):
            self.close(bound)  # every support better than `bound` is outside this box
            return False
        node.lo, node.hi = node.lo.copy(), node.hi.copy()
        node.hi[keep] = 0
        node.lo[remove] = 1
        if not _propagate(self.form, node.lo, node.hi):
            self.close(bound)
            return False
        return True

    def run(self) -> Result:
        form = self.form
        lo, hi = np.zeros(form.p), np.ones(form.p)
        if not _propagate(form, lo, hi):
            return Result(keep=np.flatnonzero(~self.removed), status=Status.ERROR,
                          message="the budgets admit no support")
        heapq.heappush(self.heap, _Node(-math.inf, next(self.counter), lo, hi))
        self.search()
        return self.result()

    def search(self) -> None:
        """The root, then the nodes here; with workers > 1, the workers start once this process
        has searched alone for workers_after seconds (small trees end before)."""
        params = self.params
        workers = int(params.workers)
        if (picked := self.next_node()) is not None:
            self.root(picked[0])
        start_at = self.t_start + params.workers_after
        more = picked is not None
        while (workers == 1 or time.perf_counter() < start_at) and (more := self.step_here()):
            pass
        late = self.deadline is not None and time.perf_counter() > self.deadline
        if workers > 1 and more and self.heap and not late:
            with worker_pool(workers, _worker_init, (self.instance, params), "shor-bnb") as pool:
                self.pool, self.ready = pool
                self.parallel()

    def step_here(self) -> bool:
        """Bound the next node in this process; False when there is none (see next_node)."""
        if (picked := self.next_node()) is None:
            return False
        node, T_steps = picked
        self.settle(node, _evaluate(self.form, self.params, node, self.UB - self.tol, self.deadline, T_steps))
        return True

    def root(self, node: _Node) -> None:
        """The root: a cold start with more Newton steps and ascent steps on T."""
        form, params, instance = self.form, self.params, self.instance
        progress = lambda F: self.trace.add(instance.full_objective + self.UB,  # noqa: E731
                                            instance.full_objective + F)
        bounded = _bound_node(form, params, node, self.UB - self.tol, self.deadline, True, params.root_T_steps,
                              self.info, progress)
        self.root_node, self.root_bounded = _Node(node.lb, 0, node.lo, node.hi), bounded
        self.settle(node, _evaluate(form, params, node, self.UB - self.tol, self.deadline, 0, bounded))

    def probe_root(self) -> None:
        """Probing of the root box, once the tree has proved large: fixings valid for every support
        better than the incumbent, applied to the open nodes as they are taken (`next_node`)."""
        form, params = self.form, self.params
        node, bounded = self.root_node, self.root_bounded
        self.root_bounded = None  # its memory
        for _ in range(params.probe_rounds):
            probed = self.probe(node, bounded)
            if probed is None:
                break
            node = probed
            if not (node.lo < node.hi).any():  # one support left
                break
            bounded = _bound_node(form, params, node, self.UB - self.tol, self.deadline, True, params.root_T_steps,
                                  self.info)
        self.fixed = (node.hi == 0, node.lo > 0, self.UB - self.tol)
        self.info["probe_err_bound"] = min(max(node.lb, self.root_node.lb), self.UB) / self.full

    def probe(self, node: _Node, bounded: tuple) -> _Node | None:
        """Probing: bound both children of every free group of the node. A child that reaches the
        incumbent fixes its group the other way, and max_g min(g's children) bounds the node (raises
        node.lb). Returns the node with the new fixings to bound again, or None (no new fixing, or the
        node is done)."""
        form, info = self.form, self.info
        F_u, u, dual, free_ids, a_primal, T, _ = bounded
        F = max(F_u, node.lb)
        T32 = T.astype(np.float32)
        bounds = np.full((free_ids.size, 2), math.inf)  # [g kept, g removed]
        children, where = [], []
        for k, g in enumerate(free_ids):
            for value in (0, 1):
                lo2, hi2 = node.lo.copy(), node.hi.copy()
                (lo2 if value else hi2)[g] = value
                if not _propagate(form, lo2, hi2):
                    continue
                if not (lo2 < hi2).any():
                    bounds[k, value] = form.cost(lo2 > 0)
                    self.offer(lo2 > 0, bounds[k, value])
                    continue
                children.append(_Node(F, 0, lo2, hi2, a_primal, u[dual.s_delta], free_ids, T32))
                where.append((k, value))
        for (k, value), ev in zip(where, self.evaluate_many(children)):
            for key, v in ev.counters.items():
                info[key] += v
            self.offer(ev.candidate, ev.cost)
            bounds[k, value] = max(F, ev.F_u)
        info["probes"] += len(children)
        node.lb = max(F, float(bounds.min(1).max(initial=-math.inf)))
        prune_at = self.UB - self.tol
        if node.lb >= prune_at:
            return None
        keep, remove = bounds[:, 1] >= prune_at, bounds[:, 0] >= prune_at  # removing g / keeping g fails
        if not (keep.any() or remove.any()):
            return None
        info["fixed_by_probing"] += int(keep.sum() + remove.sum())
        lo, hi = node.lo.copy(), node.hi.copy()
        hi[free_ids[keep]] = 0
        lo[free_ids[remove]] = 1
        if not _propagate(form, lo, hi):  # no support better than the incumbent
            node.lb = math.inf
            return None
        if not (lo < hi).any():
            self.offer(lo > 0)
        return _Node(node.lb, node.order, lo, hi, a_primal, u[dual.s_delta], free_ids, T32)

    def evaluate_many(self, nodes: list) -> list:
        """Bound the nodes (no ascent on T): in the workers once they have started, else here."""
        prune_at = self.UB - self.tol
        if self.pool is None:
            return [_evaluate(self.form, self.params, n, prune_at, self.deadline, 0) for n in nodes]
        for f in self.ready:
            f.result()
        n = len(nodes)
        return list(self.pool.map(_worker_evaluate, nodes, [prune_at] * n, [self.deadline] * n, [0] * n,
                                  chunksize=max(1, n // (8 * int(self.params.workers)))))

    def parallel(self) -> None:
        """Bound up to `workers` nodes at a time in the worker processes; this process searches
        alone until they have started (small trees end before that)."""
        import concurrent.futures as cf

        workers = int(self.params.workers)
        while not all(f.done() for f in self.ready):
            if not self.step_here():
                return
        for f in self.ready:
            f.result()  # a worker that failed to start raises here
        self.info["workers"] = workers
        while True:
            while len(self.in_flight) < workers and (picked := self.next_node()) is not None:
                node, T_steps = picked
                fut = self.pool.submit(_worker_evaluate, node, self.UB - self.tol, self.deadline, T_steps)
                self.in_flight[fut] = node
            if not self.in_flight:
                return
            done, _ = cf.wait(self.in_flight, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                node = self.in_flight.pop(fut)
                self.settle(node, fut.result())

    def settle(self, node: _Node, ev: _Evaluation) -> None:
        """Take a bounded node's bound and incumbents; prune it, fix groups by bound, or branch."""
        form, params, info, instance = self.form, self.params, self.info, self.instance
        for k, v in ev.counters.items():
            info[k] += v
        lo, hi, free_ids = node.lo, node.hi, ev.free_ids
        F_u = ev.F_u
        F = max(F_u, node.lb)  # the node's bound; F_u is the one that goes with the multipliers
        if info["root_err_bound"] is None:
            info["root_err_bound"] = F / self.full
        # incumbents: the largest a of every part removed (rounding); OSSCAR within the fixings at
        # nodes 1, 2, 4, 8, ...
        self.offer(ev.candidate, ev.cost)
        n = info["nodes"]
        if n & (n - 1) == 0 and 1 < n <= params.osscar_nodes and n != self.osscar_at:
            self.osscar_at = n
            S = restricted_osscar(instance, hi == 0, lo > 0, self.deadline)
            if S is not None:
                mask = np.ones(form.p, bool)
                mask[S] = False
                self.offer(mask)
                info["osscar_runs"] += 1
        UB, prune_at = self.UB, self.UB - self.tol
        self.trace.add(instance.full_objective + UB,
                       instance.full_objective + min(F, UB, self.pruned_min, self.open_min()))
        if F >= prune_at:
            self.close(F)
            return
        # l_g / h_g: what forcing g removed / kept adds to this bound (valid at F_u only, not the
        # inherited bound)
        lm, hm = ev.lm, ev.hm
        lo, hi = lo.copy(), hi.copy()
        # the node's T for its children (any T gives a valid bound), while the open nodes' copies fit
        T_pass = ev.T32 if (len(self.heap) + 2) * ev.T32.size * 4 <= self.T_bytes else None
        fix_keep = F_u + lm >= prune_at
        fix_remove = F_u + hm >= prune_at
        if np.any(fix_keep & fix_remove):  # both children of a group reach the incumbent: so does the node
            self.close(float(np.min(np.minimum(F_u + lm, F_u + hm)[fix_keep & fix_remove])))
            return
        if fix_keep.any() or fix_remove.any():
            info["fixed_by_bound"] += int(fix_keep.sum() + fix_remove.sum())
            self.close(float(np.min(np.concatenate([(F_u + lm)[fix_keep], (F_u + hm)[fix_remove]]))))
            hi[free_ids[fix_keep]] = 0
            lo[free_ids[fix_remove]] = 1
            if _propagate(form, lo, hi):
                heapq.heappush(self.heap, _Node(F, next(self.counter), lo, hi, ev.a_primal, ev.delta, free_ids,
                                                T_pass))
            return
        g = free_ids[np.argmin(np.abs(ev.a_hat[free_ids] - 0.5))]
        k = int(np.flatnonzero(free_ids == g)[0])
        for value, bound in ((0, max(F, F_u + hm[k])), (1, max(F, F_u + lm[k]))):
            lo2, hi2 = lo.copy(), hi.copy()
            (lo2 if value else hi2)[g] = value
            if bound >= prune_at:
                self.close(bound)
            elif _propagate(form, lo2, hi2):
                heapq.heappush(self.heap, _Node(bound, next(self.counter), lo2, hi2, ev.a_primal, ev.delta,
                                                free_ids, T_pass))

    def result(self) -> Result:
        info, full, instance = self.info, self.full, self.instance
        bound_cost = min(self.UB, self.pruned_min, self.open_min())
        UB = self.UB
        info["seconds_total"] = time.perf_counter() - self.t_start
        info["open_nodes"] = len(self.heap)
        if info["root_err_bound"] is None:
            info["root_err_bound"] = bound_cost / full if math.isfinite(bound_cost) else None
        info["trace"] = self.trace.finish(instance.full_objective + UB, instance.full_objective + bound_cost)
        closed = bound_cost >= UB - self.tol
        status = Status.OPTIMAL if closed else Status.TIME_LIMIT if self.timed_out else Status.FEASIBLE
        msg = "" if closed else (f"gap left: bound err {bound_cost / full:.6g} vs incumbent err {UB / full:.6g}"
                                 if math.isfinite(bound_cost) else "no bound yet: give it more time")
        bound = instance.full_objective + bound_cost if math.isfinite(bound_cost) else None
        return Result(keep=np.flatnonzero(~self.removed), status=status, bound=bound, info=info, message=msg)


def _bound_node(form: ComplementForm, params: ShorBnbParams, node: _Node, prune_at: float, deadline: float | None,
                root: bool, T_steps: int, info: dict, progress=None):
    """The node's dual bound: T from the parent (inherit_T, at nodes that climb) or from the
    restricted primal (`_own_T`), then T_steps of the ascent on T. Returns (F_u, u, dual,
    free_ids, a_primal, T, a_free); F_u goes with u's multipliers (the node's bound is
    max(F_u, node.lb))."""
    lo, hi = node.lo, node.hi
    steps = params.newton_steps * (4 if root else 1)  # the root starts cold
    iterations = ShorDual.iterations
    if params.inherit_T and T_steps and not root and node.T is not None and node.delta is not None:
        # the parent's climbed T bounds the node at least as well as the parent; the climb below
        # adapts it to the node's box, in place of the restricted primal
        info["T_inherited"] += 1
        T, a_primal, free_ids = node.T.astype(np.float64), node.a, np.flatnonzero(lo < hi)
        dual, u, F_u, a_free = ShorDual.descend_at_node(form, T, lo, hi, node.delta, steps, prune_at, deadline,
                                                        params.mu_T, node.free)
    else:
        T, dual, u, F_u, a_free, free_ids, a_primal = _own_T(form, params, node, prune_at, deadline, root, steps,
                                                             info, progress)
    if T_steps:
        T, dual, u, F_u, a_free = improve_T(form, T, lo, hi, dual, free_ids, u, F_u, a_free, T_steps, params.mu_T,
                                            steps, prune_at, deadline, ROOT_T_TRIALS if root else NODE_T_TRIALS)
    info["newton_iterations"] += ShorDual.iterations - iterations
    return F_u, u, dual, free_ids, a_primal, T, a_free


def _own_T(form: ComplementForm, params: ShorBnbParams, node: _Node, prune_at: float, deadline: float | None,
           root: bool, steps: int, info: dict, progress):
    """T from the node's restricted primal, descended; where it bounds the node below its parent,
    the parent's T too, and the better kept. Returns (T, dual, u, F_u, a_free, free_ids, a_primal)."""
    lo, hi = node.lo, node.hi
    primal_deadline = deadline
    if deadline is not None and root:  # leave the root's Newton steps most of the time
        now = time.perf_counter()
        primal_deadline = now + params.primal_share * max(deadline - now, 0.0)
    a_primal, _, T = form.restricted_primal(lo, hi, node.a, params.primal_steps, deadline=primal_deadline)
    dual, free_ids = ShorDual.at_node(form, T, lo, hi)
    u = dual.start() if node.delta is None or node.free is None else \
        dual.warm(_restrict(node.delta, node.free, free_ids))
    # the root's values bound every support: the trace follows them (a full layer's root
    # takes the whole time limit)
    u, F_u, a_free = dual.descend(u, steps, prune_at, deadline, params.mu_T, progress)
    if node.T is not None and F_u < node.lb:
        # this T bounds the node below its parent: the parent's T bounds it at least as well as
        # the parent (same T, a smaller box), up to the descent's convergence
        T2 = node.T.astype(np.float64)
        dual2, u2, F2, a2 = ShorDual.descend_at_node(form, T2, lo, hi, u[dual.s_delta], steps, prune_at,
                                                     deadline, params.mu_T)
        info["parent_T_tried"] += 1
        if F2 > F_u:
            T, dual, u, F_u, a_free = T2, dual2, u2, F2, a2
            info["parent_T_taken"] += 1
    return T, dual, u, F_u, a_free, free_ids, a_primal


def improve_T(form: ComplementForm, T: np.ndarray, lo: np.ndarray, hi: np.ndarray, dual: ShorDual,
              free_ids: np.ndarray, u: np.ndarray, F: float, a_free: np.ndarray, iters: int, mu_rel: float,
              steps: int, prune_at: float, deadline: float | None, trials=ROOT_T_TRIALS):
    """Ascent on T for one node. The bound for T is min over the relaxation of
    tr(T'D_a L) - 0.5 tr(T'(K o P)T), concave in T; its maximizer for the lifted point
    (a, P) that prices the current dual is T* = (K o P)^-1 D_a L, so T moves towards T*
    (the fractions `trials` of the way, in turn) while the node's bound rises. Below the root,
    half the way raises the bound at one node in six and a quarter at 94% of them (SmolLM2
    layer 5's 100-neuron crop), so nodes start at a quarter: one descent fewer per node.
    Returns (T, dual, u, F, a_free) of the best T; every value on the way is a valid bound by
    itself."""
    ones = np.flatnonzero(lo > 0)
    involved = np.concatenate([free_ids, ones])
    pos = np.full(form.p, -1)
    pos[involved] = np.arange(involved.size)
    rows = np.flatnonzero(pos[form.gid] >= 0)
    gi = pos[form.gid[rows]]  # every row's place among the groups involved
    nf = free_ids.size
    same_group = gi[:, None] == gi[None, :]
    for _ in range(iters):
        if F >= prune_at or (deadline is not None and time.perf_counter() > deadline):
            break
        # the lifted point: from the central point the last descent passed (mu within 10x of mu_rel),
        # else from Newton steps back up to mu_rel
        central = dual.central
        lifted = dual.priced_point(*central) if central is not None and central[1] >= 0.1 * mu_rel * dual.scale \
            else dual.lifted_point(u, mu_rel * dual.scale, steps, deadline)
        if lifted is None:
            break
        a = np.ones(involved.size)  # groups fixed removed have a = 1 and P = 1 with every other
        a[:nf] = lifted[0]
        P = np.outer(a, a)
        P[:nf, :nf] = lifted[1]
        P_rows = np.where(same_group, a[gi][:, None], P[np.ix_(gi, gi)])
        cf, info = _potrf(form.K[np.ix_(rows, rows)] * P_rows, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            break
        T_star, _ = _potrs(cf, a[gi][:, None] * form.L[rows], lower=1)
        for t in trials:
            T_new = T.copy()
            T_new[rows] += t * (T_star - T[rows])
            dual_new, u_new, F_new, a_new = ShorDual.descend_at_node(form, T_new, lo, hi, u[dual.s_delta], steps,
                                                                     prune_at, deadline, mu_rel)
            if F_new > F:
                T, dual, u, F, a_free = T_new, dual_new, u_new, F_new, a_new
                break
        else:
            break
    return T, dual, u, F, a_free


def _restrict(delta: np.ndarray, from_ids: np.ndarray, to_ids: np.ndarray) -> np.ndarray:
    """A parent's delta on the child's free groups (a subset of the parent's)."""
    pos = np.searchsorted(from_ids, to_ids)
    return delta[pos]


def _round(form: ComplementForm, a: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Removal mask taking the largest a of every part (fixings respected)."""
    score = np.where(lo > 0, 2.0, np.where(hi < 1, -1.0, a))
    removed = np.zeros(form.p, bool)
    for j in range(form.remove.size):
        mem = np.flatnonzero(form.parts == j)
        removed[mem[np.argsort(-score[mem], kind="stable")[: int(form.remove[j])]]] = True
    return removed
