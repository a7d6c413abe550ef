"""Relaxation lower bounds: the perspective relaxation by three methods.

For a validated split D (`exact.perspective`) the perspective relaxation is

    min_{W, z}  0.5 tr(W'(H - D)W) + sum_g 0.5 tr(W_g' D_g W_g) / z_g - tr(F'W)
    s.t.        0 <= z <= 1,  sum_{g in part j} z_g = budget_j

(with one part of budget `keep` without a partition). Methods (`methods`):

* ``newton``: projected Newton on c(z) = min_W (...) in torch (diagonal D
  only; `exact.relaxation`), the fastest and usually tightest;
* ``cvxpy``: the conic program above (rotated second-order cones, Clarabel);
* ``highs``: the same relaxation in z-space, min_{z in Z} c(z) with
  c(z) = -0.5 tr(F'(H - D + D Z^-1)^-1 F), by a proximal bundle method whose
  subproblems (cutting-plane model of c plus a proximal term) are HiGHS QPs
  (works with block-diagonal D). A QP in the W-space (d * rank(G)
  variables, dense Hessian I (x) (H - D)) stalled HiGHS's active-set solver
  for minutes already at d = 20, so it is not used.

No method's solver output is trusted as a bound: the W each returns goes
through the Fenchel bound -0.5 tr(W'AW) - 0.5 max_S sum_{g in S} q_g
(`PerspectiveModel.bound`), valid for any W. The best bound is returned with
the better of OSSCAR's support and the rounded relaxation (top z per part);
status OPTIMAL when that support closes the gap.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from osscar_opt.errors import SolverError
from osscar_opt.registry import Result, Solver, Status, register

from ._common import (
    GAP_TOL,
    SplitSolver,
    Trace,
    quiet_highs,
    objective_of,
    osscar_support,
    remaining,
)
from .perspective import SPLIT_METHODS, PerspectiveModel, best_selection, split_for
from .relaxation import NodeRelaxation, RootData

RELAX_METHODS = ("newton", "cvxpy", "highs")


@dataclass
class RelaxParams:
    """Parameters of the relaxation bounds.

    methods: comma-separated subset of newton, cvxpy, highs.
    split: "optimal" (bound-maximizing diagonal), "max-trace" (the SDP
        max sum D, cvxpy), "lambda-min" or "conditional" (t / diag(H^-1):
        cheap and much stronger than lambda-min on full layers, where
        "optimal" takes minutes to converge unless capped by split_seconds).
    block: with split="max-trace", a full PSD block per group (groups of
        more than one row; newton is then skipped, it needs a diagonal D).
    cvxpy_solver: conic solver for the cvxpy method (default Clarabel).
    highs_rounds: bundle iterations (one HiGHS QP each).
    highs_round_seconds: time cap of one HiGHS QP solve.
    max_qp_variables: skip cvxpy when d * rank(G) exceeds this.
    split_seconds: with split="optimal", stop the diagonal's Newton method
        after this many seconds, started from the conditional split, and
        leave the rest of the time limit to the relaxation (for full layers,
        where it needs minutes to converge). None: no cap, started from an
        interior point of the max-trace problem.
    """

    methods: str = "newton,cvxpy,highs"
    split: str = "optimal"
    block: bool = False
    cvxpy_solver: str | None = None
    highs_rounds: int = 200
    highs_round_seconds: float = 10.0
    max_qp_variables: int = 40_000
    split_seconds: float | None = None
    gap_tol: float = GAP_TOL
    threads: int | None = 1

    def __post_init__(self):
        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        bad = [m for m in names if m not in RELAX_METHODS]
        if bad or not names:
            raise ValueError(f"methods must be a comma-separated subset of {', '.join(RELAX_METHODS)}, got {self.methods!r}")
        if self.split not in SPLIT_METHODS:
            raise ValueError(f"split must be one of {', '.join(SPLIT_METHODS)}")
        if self.split_seconds is not None and not (self.split_seconds > 0 and self.split == "optimal"):
            raise ValueError("split_seconds must be a positive number of seconds, and needs split='optimal'")

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


def newton_relaxation(model: PerspectiveModel, deadline: float | None, trace: list | None = None,
                      max_steps: int = 100) -> tuple[float, np.ndarray]:
    """Root perspective relaxation by projected Newton (torch); (bound, z)."""
    inst = model.instance
    parts, budget = model.parts, model.budget
    root = RootData(
        H=torch.as_tensor(inst.H), F=torch.as_tensor(model.F), D=model.split.diagonal(),
        D_t=torch.as_tensor(model.split.diagonal()), group_rows=inst.group_rows,
        sizes=inst.group_sizes.astype(np.int64), parts=parts, budget=budget,
    )
    p = inst.n_groups
    fixed_in, fixed_out = np.zeros(p, bool), np.zeros(p, bool)
    for j in range(budget.size):  # parts without a choice
        mem = parts == j
        if budget[j] == 0:
            fixed_out |= mem
        elif budget[j] == mem.sum():
            fixed_in |= mem
    free = ~fixed_in & ~fixed_out
    z = fixed_in.astype(np.float64)
    if not free.any():
        return objective_of(inst, model.F, np.flatnonzero(fixed_in)), z
    relax = NodeRelaxation(root, fixed_in, free)
    out = relax.solve(None, None, max_steps=max_steps, min_steps=0, rtol=1e-12, deadline=deadline, trace=trace)
    z[relax.free_groups] = out["z"]
    return out["lb"], z


def cvxpy_relaxation(model: PerspectiveModel, solver: str | None, deadline: float | None) -> tuple[float, np.ndarray]:
    """The perspective relaxation as a conic program in cvxpy; (Fenchel bound of its W, z)."""
    import cvxpy as cp

    inst = model.instance
    d, r = model.F.shape
    w, U = np.linalg.eigh(model.A)
    keep_ev = w > 1e-14 * max(w[-1], 1e-300)
    R = (U[:, keep_ev] * np.sqrt(w[keep_ev])).T  # A = R'R
    sigma = math.sqrt(-inst.full_objective)
    Fs = model.F / sigma  # objective in units of |f(all)|
    W = cp.Variable((d, r))
    z = cp.Variable(inst.n_groups)
    persp = []
    for g, rows in enumerate(inst.group_rows):
        Dg = model.Dm[np.ix_(rows, rows)]
        Lg = np.linalg.cholesky(Dg)
        persp.append(cp.quad_over_lin(Lg.T @ W[rows, :], z[g]))
    objective = 0.5 * cp.sum_squares(R @ W) + 0.5 * cp.sum(cp.hstack(persp)) - cp.sum(cp.multiply(Fs, W))
    cons = [z >= 0, z <= 1]
    for j in range(model.budget.size):
        cons.append(cp.sum(z[np.flatnonzero(model.parts == j)]) == int(model.budget[j]))
    prob = cp.Problem(cp.Minimize(objective), cons)
    name = solver or ("CLARABEL" if "CLARABEL" in cp.installed_solvers() else "SCS")
    opts = {}
    left = remaining(deadline)
    if math.isfinite(left):
        opts = {"time_limit": max(0.1, left)} if name == "CLARABEL" else {"time_limit_secs": max(0.1, left)} if name == "SCS" else {}
    try:
        prob.solve(solver=name, **opts)
    except cp.error.SolverError as exc:
        raise SolverError(f"cvxpy relaxation failed in {name} ({exc}): try cvxpy_solver='SCS' or methods='newton'") from None
    if W.value is None:
        return -math.inf, np.full(inst.n_groups, np.nan)
    lb, _ = model.bound(np.asarray(W.value) * sigma)
    return lb, np.clip(np.asarray(z.value, dtype=np.float64), 0.0, 1.0)


def highs_relaxation(model: PerspectiveModel, rounds: int, deadline: float | None,
                     start_points: list[np.ndarray], round_seconds: float = 10.0,
                     cuts_out: list | None = None) -> tuple[float, np.ndarray, int]:
    """min_{z in Z} c(z) by a proximal bundle method whose subproblems are HiGHS QPs.

    Every evaluated point z_k gives the cut c(z) >= c(z_k) + g_k'(z - z_k)
    (c convex, g_k = -0.5 q(z_k)). Each round solves the QP

        min_{z in Z, eta}  eta + (1 / 2 tau) ||z - z_center||^2   s.t. eta >= every cut

    in HiGHS (p + 1 variables, one row per cut, kept alive and extended), moves
    the center on sufficient decrease (serious step) and otherwise only adds
    the cut (null step). The bound is the best Fenchel bound
    c(z_k) + min_{z' in Z} g_k'(z' - z_k) over the evaluated points: valid
    without trusting HiGHS's tolerances. Works with block splits too.
    Returns (best bound, its z, rounds run), objective in instance units;
    `cuts_out` collects every cut as (c_k, g_k, z_k) in units of |f(all)|.
    """
    import highspy

    inst = model.instance
    p = inst.n_groups
    unit = -inst.full_objective
    h = quiet_highs()
    h.setOptionValue("qp_iteration_limit", 1000 * (p + 1))  # a QP this small needs far fewer; more means cycling
    inf = highspy.kHighsInf
    h.addVars(p + 1, np.concatenate([np.zeros(p), [-inf]]), np.concatenate([np.ones(p), [inf]]))
    for j in range(model.budget.size):
        mem = np.flatnonzero(model.parts == j)
        h.addRow(float(model.budget[j]), float(model.budget[j]), mem.size, mem.astype(np.int32), np.ones(mem.size))
    cols = np.arange(p + 1, dtype=np.int32)
    best = {"lb": -math.inf, "z": None}

    def evaluate(z: np.ndarray) -> tuple[float, np.ndarray]:
        c, g, _ = model.value(z)
        c, g = c / unit, g / unit
        # Fenchel / Frank-Wolfe bound at z: c + min_{z'} g'(z' - z) = c - g'z - max_S sum_{S} (-g)
        top, _ = best_selection(-g, model.parts, model.budget)
        lb = (c - float(g @ z) - top) * unit
        if lb > best["lb"]:
            best["lb"], best["z"] = lb, z.copy()
        h.addRow(c - float(g @ z), inf, p + 1, cols, np.concatenate([-g, [1.0]]))  # eta - g'z >= c - g'z_k
        if cuts_out is not None:
            cuts_out.append((c, g, z.copy()))
        return c, g

    center = None
    c_center = math.inf
    for z0 in start_points:
        c0, _ = evaluate(np.clip(z0, 0.0, 1.0))
        if c0 < c_center:
            center, c_center = np.clip(z0, 0.0, 1.0), c0
    tau = 1.0
    done = 0
    for done in range(1, rounds + 1):
        left = remaining(deadline)
        if left <= 0 or center is None:
            break
        h.setOptionValue("time_limit", float(min(left, round_seconds)))
        h.passHessian(p + 1, p, int(highspy.HessianFormat.kTriangular), np.concatenate([np.arange(p), [p, p]]).astype(np.int32),
                      np.arange(p, dtype=np.int32), np.full(p, 1.0 / tau))
        h.changeColsCost(p + 1, cols, np.concatenate([-center / tau, [1.0]]))
        h.run()
        if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            # HiGHS's active-set QP method can cycle on degenerate cut sets: retry from
            # scratch with a perturbed proximal weight, then give up (the bound so far stands)
            tau *= 0.7
            h.clearSolver()
            h.passHessian(p + 1, p, int(highspy.HessianFormat.kTriangular), np.concatenate([np.arange(p), [p, p]]).astype(np.int32),
                          np.arange(p, dtype=np.int32), np.full(p, 1.0 / tau))
            h.changeColsCost(p + 1, cols, np.concatenate([-center / tau, [1.0]]))
            h.run()
            if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
                break
        x = np.asarray(h.getSolution().col_value)
        z_new, model_value = np.clip(x[:p], 0.0, 1.0), float(x[p])
        predicted = c_center - model_value
        if predicted <= 1e-12 * max(1.0, abs(c_center)):
            break  # the model agrees with c at the center: converged
        c_new, _ = evaluate(z_new)
        if c_new <= c_center - 0.1 * predicted:
            center, c_center = z_new, c_new
            tau = min(tau * 2.0, 1e3)
        else:
            tau = max(tau * 0.5, 1e-6)
        if (c_center * unit - best["lb"]) <= 1e-10 * unit:
            break
    z = best["z"] if best["z"] is not None else np.full(p, np.nan)
    return best["lb"], z, done


@register
class Relax(SplitSolver, Solver):
    name = "relax"
    exact = False  # a bound provider: proves optimality only when the relaxation closes the gap
    requires = ("cvxpy", "highspy")
    devices = ("cpu",)
    Params = RelaxParams
    description = "perspective relaxation lower bounds (torch Newton, cvxpy conic, HiGHS QP cuts) + rounded support"

    def _run(self, state, params, deadline):
        inst, F = state["instance"], state["F"]
        full = inst.full_objective
        info: dict = {"bounds": {}}
        progress = Trace(full)
        S0 = osscar_support(inst, "cpu", deadline)
        UB, best_S = objective_of(inst, F, S0), S0
        split_deadline, start = deadline, None
        if params.split_seconds is not None:  # a capped optimal diagonal, from the conditional split
            cap = time.perf_counter() + params.split_seconds
            split_deadline, start = cap if deadline is None else min(deadline, cap), "conditional"
        split = split_for(inst, params.split, block=params.block, F=F, deadline=split_deadline, start=start)
        info["split"] = {"method": split.method, "seconds": split.seconds, "diagonal": split.is_diagonal,
                         "newton_steps": split.info.get("newton_steps"), "stopped": split.info.get("stopped")}
        model = PerspectiveModel(inst, F, split)
        best_lb, best_z = -math.inf, None
        trace: list = []
        big = F.shape[0] * F.shape[1] > params.max_qp_variables
        for method in params.method_list:
            if remaining(deadline) <= 0:
                break
            t0 = time.perf_counter()
            if method == "newton":
                if not split.is_diagonal:
                    info["bounds"]["newton"] = "skipped: needs a diagonal split"
                    continue
                lb, z = newton_relaxation(model, deadline, trace)
            elif big and method == "cvxpy":
                info["bounds"][method] = f"skipped: d*rank(G) = {F.shape[0] * F.shape[1]} > max_qp_variables"
                continue
            elif method == "cvxpy":
                lb, z = cvxpy_relaxation(model, params.cvxpy_solver, deadline)
            else:
                starts = [trace[i] for i in np.unique(np.linspace(0, len(trace) - 1, 8).astype(int))] if trace else []
                z_uniform = np.zeros(inst.n_groups)
                for j in range(model.budget.size):
                    mem = model.parts == j
                    z_uniform[mem] = model.budget[j] / mem.sum()
                starts.append(z_uniform)
                lb, z, rounds = highs_relaxation(model, params.highs_rounds, deadline, starts, params.highs_round_seconds)
                info["highs_rounds"] = rounds
            info["bounds"][method] = {"bound": lb, "err_bound": (lb - full) / (-full), "seconds": time.perf_counter() - t0}
            if lb > best_lb:
                best_lb, best_z = lb, z
            if best_z is not None and np.all(np.isfinite(z)):
                _, chosen = best_selection(z, model.parts, model.budget)
                S = np.flatnonzero(chosen)
                val = objective_of(inst, F, S)
                if val < UB:
                    UB, best_S = val, S
            progress.add(UB, best_lb)
        bound = min(best_lb, UB) if math.isfinite(best_lb) else None
        info["trace"] = progress.finish(UB, bound)
        tol = params.gap_tol * (-full)
        if bound is not None and bound >= UB - tol:
            status = Status.OPTIMAL
        elif remaining(deadline) <= 0:
            status = Status.TIME_LIMIT
        else:
            status = Status.FEASIBLE
        return Result(keep=best_S, status=status, bound=bound, info=info)
