"""Outer approximation (Bertsimas & Van Parys cutting planes) with a HiGHS MILP master.

With a validated split D (`exact.perspective`), the MIQP is

    min_{z binary, z in Z}  c(z),   c(z) = min_W 0.5 tr(W'(H-D)W) + sum_g 0.5 tr(W_g'D_gW_g)/z_g - tr(F'W)
                                     = -0.5 tr(F'(H - D + D Z^-1)^-1 F)

(c(z) = f(S) at binary z, c convex on [0, 1]^p, dc/dz_g = -0.5 tr(V_g'D_g^-1V_g)
with V = F - (H - D)W(z)). The master MILP over the p indicators and eta,

    min eta   s.t.  eta >= c(z_k) + grad c(z_k)'(z - z_k)  for every cut point z_k,  z in Z binary,

is a relaxation, so its optimal value is a lower bound. The loop solves it,
evaluates f at its solution (upper bound), adds that cut and repeats until
the master bound reaches the incumbent. The master is one `highspy.Highs`
object kept alive: cuts are appended as rows (never rebuilt). Seeded with
OSSCAR's support and with the cuts of the root relaxation (fractional
points from the bundle method of `exact.relax`, so the master's LP
relaxation starts at the perspective relaxation bound).

Objective in units of |f(all)|; the master's tolerances are set to 1e-9, the
bound reported is the master's dual bound less a 1e-8 |f(all)| safety
margin, and OPTIMAL means a gap below gap_tol (default 1e-7, what a MILP
master certifies reliably).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from osscar_opt.registry import Result, Solver, Status, register

from ._common import (
    SplitSolver,
    Trace,
    quiet_highs,
    objective_of,
    osscar_support,
    remaining,
)
from .perspective import SPLIT_METHODS, PerspectiveModel, split_for
from .relax import highs_relaxation

_SAFETY = 1e-8  # in units of |f(all)|


@dataclass
class HighsOAParams:
    """Parameters of the outer approximation.

    split: "optimal" (default), "max-trace" (cvxpy SDP), "lambda-min" or "conditional".
    block: block-diagonal max-trace split (groups of more than one row).
    root_rounds: bundle iterations whose cuts seed the master (0: none).
    max_iterations: master solves.
    gap_tol: optimality tolerance in err units.
    """

    split: str = "optimal"
    block: bool = False
    root_rounds: int = 100
    max_iterations: int = 100_000
    gap_tol: float = 1e-7
    threads: int | None = 1

    def __post_init__(self):
        if self.split not in SPLIT_METHODS:
            raise ValueError(f"split must be one of {', '.join(SPLIT_METHODS)}")
        if not self.gap_tol >= 0:
            raise ValueError("gap_tol must be >= 0")


@register
class HighsOA(SplitSolver, Solver):
    name = "highs-oa"
    exact = True
    requires = ("highspy",)
    devices = ("cpu",)
    Params = HighsOAParams
    description = "outer approximation: HiGHS MILP master over the indicators, perspective cuts, kept alive"

    def _run(self, state, params, deadline):
        import highspy

        inst, F = state["instance"], state["F"]
        p, full = inst.n_groups, inst.full_objective
        unit = -full
        info: dict = {"iterations": 0, "cuts": 0}
        trace = Trace(full)
        best_S = osscar_support(inst, "cpu", deadline)
        UB = objective_of(inst, F, best_S)
        split = split_for(inst, params.split, block=params.block, F=F, deadline=deadline)
        info["split"] = {"method": split.method, "seconds": split.seconds}
        model = PerspectiveModel(inst, F, split)

        h = quiet_highs()
        for option in ("mip_feasibility_tolerance", "primal_feasibility_tolerance", "dual_feasibility_tolerance"):
            h.setOptionValue(option, 1e-9)
        h.setOptionValue("mip_rel_gap", 0.0)
        h.setOptionValue("mip_abs_gap", 1e-10)
        h.setOptionValue("mip_improving_solution_save", True)  # every improving master solution becomes a cut
        inf = highspy.kHighsInf
        cols = np.arange(p + 1, dtype=np.int32)
        h.addVars(p + 1, np.concatenate([np.zeros(p), [-inf]]), np.concatenate([np.ones(p), [inf]]))
        h.changeColsIntegrality(p, cols[:p], np.array([highspy.HighsVarType.kInteger] * p))
        h.changeColCost(p, 1.0)
        for j in range(model.budget.size):
            mem = np.flatnonzero(model.parts == j)
            h.addRow(float(model.budget[j]), float(model.budget[j]), mem.size, mem.astype(np.int32), np.ones(mem.size))
        cut_rhs, cut_grad = [], []

        def add_cut(c: float, g: np.ndarray, z: np.ndarray) -> None:
            # eta - g'z >= c - g'z_k   (scaled units)
            h.addRow(c - float(g @ z), inf, p + 1, cols, np.concatenate([-g, [1.0]]))
            cut_rhs.append(c - float(g @ z))
            cut_grad.append(g)
            info["cuts"] += 1

        def cut_at(S: np.ndarray) -> float:
            z = np.zeros(p)
            z[S] = 1.0
            c, g, _ = model.value(z)
            add_cut(c / unit, g / unit, z)
            return c

        # root cuts: the bundle method's points (the master LP then starts at the relaxation)
        if params.root_rounds > 0:
            root_cuts: list = []
            z_uniform = np.zeros(p)
            for j in range(model.budget.size):
                mem = model.parts == j
                z_uniform[mem] = model.budget[j] / mem.sum()
            lb_root, _, _ = highs_relaxation(model, params.root_rounds, deadline, [z_uniform], cuts_out=root_cuts)
            info["root_bound_err"] = (lb_root - full) / (-full)
            trace.add(UB, lb_root)
            for c, g, z in root_cuts:
                add_cut(c, g, z)
        cut_at(best_S)
        seen = {np.sort(best_S).tobytes()}
        master_lb = -math.inf
        stop = "gap closed"
        while True:
            if info["iterations"] >= params.max_iterations:
                stop = "iteration limit"
                break
            left = remaining(deadline)
            if left <= 0:
                stop = "time limit"
                break
            if math.isfinite(left):
                h.setOptionValue("time_limit", float(left))
            # the incumbent as a MIP start: eta = the largest cut at it
            z_best = np.zeros(p)
            z_best[best_S] = 1.0
            eta = max(r + float(g @ z_best) for r, g in zip(cut_rhs, cut_grad))
            sol = highspy.HighsSolution()
            sol.col_value = list(np.concatenate([z_best, [eta]]))
            h.setSolution(sol)
            run_status = h.run()
            info["iterations"] += 1
            status = h.getModelStatus()
            ok = run_status != highspy.HighsStatus.kError and status in (
                highspy.HighsModelStatus.kOptimal, highspy.HighsModelStatus.kTimeLimit)
            if ok:  # the master's dual bound is only read from a run that ended cleanly
                bound = h.getInfo().mip_dual_bound
                if math.isfinite(bound):
                    master_lb = max(master_lb, bound * unit)
                    trace.add(UB, master_lb - _SAFETY * unit)
            if status != highspy.HighsModelStatus.kOptimal or not ok:
                stop = "time limit" if status == highspy.HighsModelStatus.kTimeLimit else f"master {h.modelStatusToString(status)}"
                break
            if master_lb >= UB - params.gap_tol * unit:
                break
            x = np.asarray(h.getSolution().col_value)
            S = np.flatnonzero(x[:p] > 0.5)
            if np.sort(S).tobytes() in seen:  # the master proposes a cut point again: its bound is the value there
                stop = "repeated point"
                break
            candidates = [S] + [np.flatnonzero(np.asarray(sol.col_value)[:p] > 0.5) for sol in h.getSavedMipSolutions()]
            for T in candidates:
                key = np.sort(T).tobytes()
                if key in seen or T.size != inst.keep:
                    continue
                seen.add(key)
                val = cut_at(T)
                if val < UB:
                    val = objective_of(inst, F, T)
                    if val < UB:
                        UB, best_S = val, T
                        trace.add(UB, master_lb - _SAFETY * unit)
        info["stop"] = stop
        bound = min(UB, master_lb) - _SAFETY * unit if math.isfinite(master_lb) else None
        info["trace"] = trace.finish(UB, bound)
        if master_lb >= UB - params.gap_tol * unit:
            status = Status.OPTIMAL
        elif stop == "time limit":
            status = Status.TIME_LIMIT
        else:
            status = Status.FEASIBLE
        if status == Status.OPTIMAL:
            msg = ""
        elif not math.isfinite(master_lb):
            msg = f"stopped ({stop}) before the master had a bound; give it more time"
        else:
            msg = f"stopped ({stop}) with master bound err {(master_lb - full) / unit:.6g}"
        return Result(keep=best_S, status=status, bound=bound, info=info, message=msg)
