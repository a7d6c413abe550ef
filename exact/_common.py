"""Helpers shared by the exact solvers and bounds.

Notation (DESIGN.md section 1): H (d x d) SPD, W_hat (d x m), G = H W_hat,
f(S) = -0.5 tr(G_S' H_SS^-1 G_S). f depends on G only through G G', so every
exact solver works with a factor F (d x r, r = rank(G) <= min(d, m)) with
F F' = G G' instead of the m output columns.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from osscar_opt.errors import SolverError
from osscar_opt.instance import Instance
from osscar_opt.linalg import cpu_threads  # noqa: F401  (re-exported for the solvers here)

# Default relative optimality tolerance of the exact solvers, in err units:
# a support is called OPTIMAL when its err is within this of the proven bound.
GAP_TOL = 1e-9


def output_factor(instance: Instance) -> np.ndarray:
    """F (d x r) with F F' = G G' exactly (G = H W_hat), r = min(d, m).

    For m <= d this is G itself; for m > d it is R' from the QR factorization
    G' = Q R (so G G' = R' R). f(S) = -0.5 tr(F_S' H_SS^-1 F_S) for every S.
    Same construction as `osscar_opt.linalg.output_factor`, in numpy.
    """
    G = instance.H @ instance.W
    if G.shape[1] <= G.shape[0]:
        return np.ascontiguousarray(G)
    R = scipy.linalg.qr(G.T, mode="r", check_finite=False)[0][: G.shape[0]]
    return np.ascontiguousarray(R.T)


def parts_and_budget(instance: Instance) -> tuple[np.ndarray, np.ndarray]:
    """(part id per group, groups kept per part); one part with budget keep without a partition."""
    if instance.partition is None:
        return np.zeros(instance.n_groups, dtype=np.int64), np.array([instance.keep], dtype=np.int64)
    return instance.partition.parts.astype(np.int64), instance.partition.budget.astype(np.int64)


def objective_of(instance: Instance, F: np.ndarray, keep) -> float:
    """f(S) = -0.5 ||L^-1 F_S||^2 with L the Cholesky factor of H_SS (fp64)."""
    rows = instance.rows_of(np.asarray(keep, dtype=np.int64))
    if rows.size == 0:
        return 0.0
    L, info = scipy.linalg.lapack.dpotrf(instance.H[rows[:, None], rows[None, :]], lower=1, clean=1)
    if info != 0:
        raise np.linalg.LinAlgError("H restricted to the support is not positive definite")
    Y, info = scipy.linalg.lapack.dtrtrs(L, F[rows], lower=1)
    return -0.5 * float(np.einsum("ij,ij->", Y, Y))


def osscar_support(instance: Instance, device: str = "cpu", deadline: float | None = None, **params) -> np.ndarray:
    """OSSCAR's support (greedy + local search), the warm start of every exact solver."""
    from osscar_opt.registry import solve

    limit = None
    if deadline is not None:
        limit = max(1e-3, deadline - time.perf_counter())
    sol = solve(instance, "osscar", device=device, time_limit=limit, **params)
    if sol.keep.size != instance.keep:
        raise SolverError(f"OSSCAR warm start failed ({sol.message}): run osscar alone to see why")
    return sol.keep


def restricted_instance(instance: Instance, fixed_in: np.ndarray, fixed_out: np.ndarray) -> tuple[Instance, np.ndarray]:
    """The sub-instance on the groups not fixed out, with the fixed-in groups forced in.

    Forcing is expressed as a partition: every (original part, fixed-in?) pair
    is a part; a fixed-in part keeps all its groups. Returns the instance and
    the original ids of its groups.
    """
    parts, budget = parts_and_budget(instance)
    ids = np.flatnonzero(~fixed_out)
    sub_parts = parts[ids] * 2 + fixed_in[ids].astype(np.int64)
    labels, new_parts = np.unique(sub_parts, return_inverse=True)
    new_budget = np.zeros(labels.size, dtype=np.int64)
    for j, label in enumerate(labels):
        orig, forced = divmod(int(label), 2)
        members = ids[sub_parts == label]
        if forced:
            new_budget[j] = members.size
        else:
            new_budget[j] = budget[orig] - int(np.sum(fixed_in & (parts == orig)))
    rows = np.concatenate([instance.group_rows[g] for g in ids])
    sub_groups = np.concatenate([np.full(instance.group_sizes[g], i) for i, g in enumerate(ids)])
    sub = Instance(
        instance.H[np.ix_(rows, rows)], instance.W[rows], int(new_budget.sum()),
        groups=sub_groups, partition=(new_parts, new_budget),
    )
    return sub, ids


def remaining(deadline: float | None) -> float:
    """Seconds left before `deadline` (inf without one)."""
    return math.inf if deadline is None else deadline - time.perf_counter()


@dataclass
class Scale:
    """Objective scaling used inside the solvers: f_scaled = f / |f(all)|.

    Native solvers (HiGHS, SCIP) see objectives of order 1, so their absolute
    tolerances are relative to the problem; results are scaled back.
    """

    full: float  # f(all) < 0

    @property
    def unit(self) -> float:
        return -self.full

    def to_native(self, f: float) -> float:
        return f / self.unit

    def from_native(self, f: float) -> float:
        return f * self.unit


def quiet_highs():
    """A highspy.Highs with logging off. The constructor prints a banner to
    file descriptor 1 whatever the options (highspy 1.16), which would land in
    the middle of a command's output: it is sent to the null device."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    h.setOptionValue("output_flag", False)
    return h


class Trace:
    """A solver's progress for `info["trace"]`: [[seconds, err_upper, err_lower], ...].

    `add(UB, LB)` takes objective values (f, not err) whenever the solver
    knows them; a point is kept when the values changed and at least
    `spacing` of the elapsed time has passed since the last kept one (log-
    spaced: about 1 / spacing points per e-fold of time), and `finish`
    keeps the last one, so the curve ends where the solve ended. The lower
    bound never decreases and the upper bound never increases along the
    trace (each point is the best known at its time); a lower bound below
    f(all) (err 0, which bounds every support) is raised to it. Points
    without a finite lower bound are not kept (the report draws the gap).
    """

    def __init__(self, full: float, t0: float | None = None, spacing: float = 0.02, max_points: int = 1000):
        self.full, self.unit = full, -full
        self.t0 = time.perf_counter() if t0 is None else t0
        self.spacing, self.max_points = spacing, max_points
        self.points: list[list[float]] = []
        self._ub, self._lb = math.inf, -math.inf
        self._pending: list[float] | None = None

    def add(self, ub: float, lb: float | None, force: bool = False) -> None:
        if lb is None or not math.isfinite(lb) or not math.isfinite(ub):
            return
        # f(all) bounds every support (err >= 0): a weaker bound says nothing more
        ub, lb = min(self._ub, float(ub)), max(self._lb, float(lb), self.full)
        if ub == self._ub and lb == self._lb and not force:
            return
        self._ub, self._lb = ub, lb
        t = time.perf_counter() - self.t0
        point = [t, (ub - self.full) / self.unit, (min(lb, ub) - self.full) / self.unit]
        last = self.points[-1][0] if self.points else None
        if force or last is None or t - last >= max(1e-3, self.spacing * t):
            self.points.append(point)
            self._pending = None
            if len(self.points) > self.max_points:  # thin the middle, keep both ends
                self.points = self.points[:1] + self.points[1:-1:2] + self.points[-1:]
        else:
            self._pending = point

    def finish(self, ub: float, lb: float | None) -> list[list[float]]:
        """Record the final values at the end time and return the points."""
        if self._pending is not None:
            self.points.append(self._pending)
            self._pending = None
        self.add(ub, lb, force=True)
        return self.points


def incumbent_info(instance: Instance, objective: float) -> float:
    """err of an objective value (for info dicts)."""
    return (objective - instance.full_objective) / (-instance.full_objective)


class SplitSolver:
    """Shared parts of the solvers built on a perspective split (mixed into a
    registry Solver): the block-split check, a prepare that computes the
    output factor, and run() under the thread cap; subclasses write _run."""

    def skip(self, instance, params):
        if getattr(params, "block", False) and params.split != "max-trace":
            return True, "block=True needs split='max-trace' (the other splits are diagonal)"
        max_vars = getattr(params, "max_variables", None)
        size = instance.d * min(instance.d, instance.m)
        if max_vars is not None and size > max_vars:
            return True, f"the model would have {size:,} weight variables (d * rank(G)) > max_variables={max_vars:,}"
        return False, ""

    def prepare(self, instance, params, device):
        return {"instance": instance, "F": output_factor(instance)}

    @staticmethod
    def perspective_model(instance, params):
        """(F, the PerspectiveModel of the instance under params.split), built
        under the thread cap: the common start of the MIQP formulations."""
        from .perspective import PerspectiveModel, split_for

        F = output_factor(instance)
        with cpu_threads(params.threads):
            split = split_for(instance, params.split, block=getattr(params, "block", False), F=F)
            return F, PerspectiveModel(instance, F, split)

    def run(self, state, params, deadline):
        with cpu_threads(params.threads):
            return self._run(state, params, deadline)


def restricted_osscar(instance: Instance, fixed_in: np.ndarray, fixed_out: np.ndarray, deadline) -> np.ndarray | None:
    """OSSCAR on the groups not fixed out with the fixed-in groups forced (as a partition)."""
    try:
        sub, ids = restricted_instance(instance, fixed_in, fixed_out)
        S = osscar_support(sub, "cpu", deadline, pair_swap_limit=0)
    except Exception:  # a failed heuristic only costs an incumbent
        return None
    return np.sort(ids[S])


@contextlib.contextmanager
def _main_hidden():
    """Start spawned processes without importing the caller's __main__ in them.

    multiprocessing's spawn re-imports the main script (or module) in every
    child, which re-runs a script without an `if __name__ == "__main__"`
    guard. The workers need nothing from __main__, so its file and spec are
    hidden while they start.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__.update(saved)
            if "__spec__" not in saved:
                main.__dict__.pop("__spec__", None)


def _worker_ready() -> bool:
    return True


@contextlib.contextmanager
def worker_pool(workers: int, initializer, initargs: tuple, solver: str):
    """A pool of `workers` spawned processes (torch and OpenMP do not survive fork safely), each
    set up by initializer(*initargs). Yields (pool, ready): `ready` holds one future per worker
    that completes once that worker has started. On exit the workers are stopped; a worker that
    dies raises a SolverError naming the fix."""
    import concurrent.futures as cf
    import multiprocessing

    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=initializer, initargs=initargs)
    try:
        with _main_hidden():  # each submit starts one worker; none re-runs the caller's script
            ready = [pool.submit(_worker_ready) for _ in range(workers)]
        yield pool, ready
    except cf.process.BrokenProcessPool as exc:
        raise SolverError(f"a {solver} worker process died ({exc}): run with workers=1") from None
    finally:
        # the workers hold nothing the search needs now: stop them, then wait for the pool's
        # manager thread (shutdown(wait=False) leaves it racing the interpreter's exit hooks)
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
