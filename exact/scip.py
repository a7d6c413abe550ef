"""The MIQP in SCIP (pyscipopt): perspective formulation, epigraph objective.

With a validated split D (`exact.perspective`, diagonal or block-diagonal),
A = H - D and F F' = G G' (objective in units of |f(all)|: F / sqrt|f(all)|):

    min   sum_c eta_c + 0.5 sum_g t_g
    s.t.  eta_c >= 0.5 W_c' A W_c - F_c' W_c            (one convex quadratic per output column c)
          tr(W_g' D_g W_g) <= t_g z_g,  t_g >= 0          (perspective cone = indicator: z_g = 0 forces W_g = 0)
          sum_{g in part j} z_g = budget_j,  z binary
          |W_ic| <= sqrt(2 / lambda_min(H))               (valid for every optimal W, see below)

SCIP needs a linear objective, hence the epigraph variables eta_c. With a
block D the cone is written on y_g = L_g' W_g (D_g = L_g L_g'). Besides the
cone, z_g = 0 => W_g = 0 is stated as big-M rows |W_ic| <= w_max z_g
(default) or as indicator constraints: the cone alone lets SCIP keep W_g of
order sqrt(feastol) on pruned groups, an objective error of ~1e-4 err units.
(A residual form 0.5 ||L'W - L^-1 F||^2 of the objective rows made SCIP
report dual bounds 20% above the optimum, so it is not offered.)
The model is built in `prepare` (untimed, like a factorization); `run`
installs OSSCAR's support as a start solution, passes the remaining time as
SCIP's own time limit and returns SCIP's incumbent (re-evaluated in fp64) and
its dual bound less a safety margin of 10 feastol |f(all)| (SCIP's bound
is computed within its feasibility tolerance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from osscar_opt.registry import Result, Solver, Status, register

from ._common import (
    GAP_TOL,
    SplitSolver,
    Trace,
    cpu_threads,
    objective_of,
    osscar_support,
    remaining,
)
from .perspective import SPLIT_METHODS, PerspectiveModel


@dataclass
class ScipParams:
    """Parameters of the SCIP model.

    split: perspective split, "optimal" (default), "max-trace", "lambda-min" or
        "conditional".
    block: block-diagonal max-trace split (groups of more than one row).
    linking: how z_g = 0 forces W_g = 0 besides the cone: "bigm" (default,
        |W_ic| <= w_max z_g), "indicator" (SCIP indicator constraints) or
        "none". With the cone alone SCIP accepts W_g ~ sqrt(feastol) on pruned
        groups, which moved its bound and objective by ~1e-4 err units.
    feastol: SCIP's feasibility tolerance (numerics/feastol).
    max_variables: skip instances whose model has more W entries (d * rank(G)).
    root_separation_rounds: SCIP's separating/maxroundsroot (its default -1
        can loop on the cone cuts at the root for a long time).
    """

    split: str = "optimal"
    block: bool = False
    linking: str = "bigm"
    feastol: float = 1e-7
    gap_tol: float = GAP_TOL
    max_variables: int = 20_000
    root_separation_rounds: int = 10
    threads: int | None = 1

    def __post_init__(self):
        if self.split not in SPLIT_METHODS:
            raise ValueError(f"split must be one of {', '.join(SPLIT_METHODS)}")
        if not 0 < self.feastol < 1e-3:
            raise ValueError("feastol must lie in (0, 1e-3)")
        if self.linking not in ("bigm", "indicator", "none"):
            raise ValueError("linking must be one of bigm, indicator, none")


def build_scip_model(model: PerspectiveModel, linking: str = "bigm"):
    """The pyscipopt Model of the MIQP above and its variables (z, W, t, eta)."""
    import pyscipopt as ps

    inst = model.instance
    d, r = model.F.shape
    p = inst.n_groups
    sigma = math.sqrt(-inst.full_objective)
    Fs = model.F / sigma
    m = ps.Model("osscar-miqp")
    m.hideOutput()
    # Every optimal W has tr(W'HW) = -2 f(S) <= 2 |f(all)|, so |W_ic| <= sqrt(2 |f(all)| / lambda_min(H));
    # in scaled units (W / sigma) the bound is sqrt(2 / lambda_min(H)). Without bounds SCIP's LP
    # relaxation is unbounded until enough outer-approximation cuts accumulate.
    lam = float(np.linalg.eigvalsh(inst.H)[0])
    w_max = math.sqrt(2.0 / lam) * (1.0 + 1e-6)
    z = [m.addVar(name=f"z{g}", vtype="B") for g in range(p)]
    W = [[m.addVar(name=f"w{i}_{c}", lb=-w_max, ub=w_max) for c in range(r)] for i in range(d)]
    t = [m.addVar(name=f"t{g}", lb=0.0) for g in range(p)]
    eta = [m.addVar(name=f"eta{c}", lb=None) for c in range(r)]
    for j in range(model.budget.size):
        mem = np.flatnonzero(model.parts == j)
        m.addCons(ps.quicksum(z[g] for g in mem) == int(model.budget[j]), name=f"budget{j}")
    A = model.A
    iu, ju = np.triu_indices(d, 1)
    upper = [(i, j, A[i, j]) for i, j in zip(iu, ju) if A[i, j] != 0.0]
    for c in range(r):
        col = [W[i][c] for i in range(d)]
        quad = ps.quicksum(0.5 * A[i, i] * col[i] * col[i] for i in range(d)) + ps.quicksum(a * col[i] * col[j] for i, j, a in upper)
        lin = ps.quicksum(Fs[i, c] * col[i] for i in range(d) if Fs[i, c] != 0.0)
        m.addCons(quad - lin - eta[c] <= 0, name=f"objective{c}")
    for g, rows in enumerate(inst.group_rows):
        Dg = model.Dm[np.ix_(rows, rows)]
        if model.split.is_diagonal:
            terms = ps.quicksum(model.split.D[i] * W[i][c] * W[i][c] for i in rows for c in range(r))
        else:
            Lg = np.linalg.cholesky(Dg)
            y = [[m.addVar(name=f"y{g}_{a}_{c}", lb=None) for c in range(r)] for a in range(rows.size)]
            for a in range(rows.size):
                for c in range(r):
                    m.addCons(ps.quicksum(Lg[b, a] * W[i][c] for b, i in enumerate(rows)) - y[a][c] == 0)
            terms = ps.quicksum(y[a][c] * y[a][c] for a in range(rows.size) for c in range(r))
        m.addCons(terms - t[g] * z[g] <= 0, name=f"perspective{g}")
        if linking == "indicator":
            for i in rows:
                for c in range(r):
                    m.addConsIndicator(W[i][c] <= 0, z[g], activeone=False)
                    m.addConsIndicator(-W[i][c] <= 0, z[g], activeone=False)
        elif linking == "bigm":
            for i in rows:
                for c in range(r):
                    m.addCons(W[i][c] - w_max * z[g] <= 0)
                    m.addCons(-W[i][c] - w_max * z[g] <= 0)
    m.setObjective(ps.quicksum(eta) + 0.5 * ps.quicksum(t), "minimize")
    return m, {"z": z, "W": W, "t": t, "eta": eta, "sigma": sigma}


def start_values(model: PerspectiveModel, S: np.ndarray) -> dict:
    """Values of every model variable at the support S (optimal weights on S)."""
    inst = model.instance
    sigma = math.sqrt(-inst.full_objective)
    z = np.zeros(inst.n_groups)
    z[S] = 1.0
    _, _, W = model.value(z)
    Ws = W / sigma
    Fs = model.F / sigma
    AW = model.A @ Ws
    eta = 0.5 * np.sum(Ws * AW, 0) - np.sum(Fs * Ws, 0)
    t = np.zeros(inst.n_groups)
    for g in S:
        rows = inst.group_rows[g]
        t[g] = float(np.sum(Ws[rows] * (model.Dm[np.ix_(rows, rows)] @ Ws[rows])))
    return {"z": z, "W": Ws, "t": t, "eta": eta}


def scip_bound(m, unit: float, feastol: float) -> float | None:
    """SCIP's dual bound in instance units less a safety margin of 10 feastol
    |f(all)| (SCIP's bound holds within its feasibility tolerance); None
    while SCIP has none."""
    dual = m.getDualbound()
    if math.isfinite(dual) and abs(dual) < 1e20:
        return dual * unit - 10 * feastol * unit
    return None


def best_support(m, var: dict, instance, F: np.ndarray) -> tuple[np.ndarray, float] | None:
    """SCIP's best solution as (support, objective re-evaluated in fp64); None without one."""
    if m.getNSols() == 0:
        return None
    sol = m.getBestSol()
    S = np.flatnonzero(np.array([m.getSolVal(sol, v) for v in var["z"]]) > 0.5)
    if S.size != instance.keep:
        return None
    return S, objective_of(instance, F, S)


def progress_handler(trace: Trace, instance, F: np.ndarray, var: dict, UB: float, feastol: float):
    """A SCIP event handler that feeds `trace` as the search goes: SCIP's dual
    bound (less the same safety margin as the final one) after every node and
    every LP solve, and the support of every new best solution, re-evaluated
    in fp64."""
    import pyscipopt as ps

    unit = -instance.full_objective
    events = (ps.SCIP_EVENTTYPE.NODESOLVED, ps.SCIP_EVENTTYPE.BESTSOLFOUND, ps.SCIP_EVENTTYPE.LPEVENT)
    state = {"UB": UB}

    class Progress(ps.Eventhdlr):
        def eventinit(self):
            for ev in events:
                self.model.catchEvent(ev, self)

        def eventexit(self):
            for ev in events:
                self.model.dropEvent(ev, self)

        def eventexec(self, event):
            if event.getType() == ps.SCIP_EVENTTYPE.BESTSOLFOUND:
                found = best_support(self.model, var, instance, F)
                if found is not None:
                    state["UB"] = min(state["UB"], found[1])
            trace.add(state["UB"], scip_bound(self.model, unit, feastol))

    return Progress()


@register
class Scip(SplitSolver, Solver):
    name = "scip"
    exact = True
    requires = ("pyscipopt",)
    devices = ("cpu",)
    Params = ScipParams
    description = "MIQP in SCIP (pyscipopt): perspective cones, epigraph objective, OSSCAR start"

    def prepare(self, instance, params, device):
        F, model = self.perspective_model(instance, params)
        with cpu_threads(params.threads):
            scip, var = build_scip_model(model, params.linking)
        return {"instance": instance, "F": F, "model": model, "scip": scip, "var": var}

    def _run(self, state, params, deadline):
        inst, F, model, m, var = state["instance"], state["F"], state["model"], state["scip"], state["var"]
        full = inst.full_objective
        unit = -full
        trace = Trace(full)
        S0 = osscar_support(inst, "cpu", deadline)
        UB, best_S = objective_of(inst, F, S0), S0
        m.includeEventhdlr(progress_handler(trace, inst, F, var, UB, params.feastol), "osscar-progress",
                           "records the bounds over time for info['trace']")
        start = start_values(model, S0)
        sol = m.createSol()
        for g, v in enumerate(var["z"]):
            m.setSolVal(sol, v, float(start["z"][g]))
            m.setSolVal(sol, var["t"][g], float(start["t"][g]))
        for i, row in enumerate(var["W"]):
            for c, v in enumerate(row):
                m.setSolVal(sol, v, float(start["W"][i, c]))
        for c, v in enumerate(var["eta"]):
            m.setSolVal(sol, v, float(start["eta"][c]))
        accepted = m.addSol(sol, free=True)
        m.setParam("numerics/feastol", params.feastol)
        m.setParam("limits/absgap", params.gap_tol)
        m.setParam("parallel/maxnthreads", 1)
        m.setParam("separating/maxroundsroot", params.root_separation_rounds)
        left = remaining(deadline)
        if math.isfinite(left):
            m.setParam("limits/time", max(0.05, left - 0.05))
        if not left > 0:  # OSSCAR used up the time: SCIP never ran (its statistics must not be queried then)
            info = {"scip_status": "not started", "start_accepted": bool(accepted), "nodes": 0,
                    "split": model.split.method, "trace": trace.finish(UB, None)}
            return Result(keep=best_S, status=Status.TIME_LIMIT, bound=None, info=info,
                          message="the time limit ran out before SCIP started: give it more time")
        m.optimize()
        status = m.getStatus()
        info = {"scip_status": status, "start_accepted": bool(accepted), "nodes": m.getNNodes(),
                "scip_seconds": m.getSolvingTime(), "split": model.split.method}
        bound = scip_bound(m, unit, params.feastol)
        found = best_support(m, var, inst, F)
        if found is not None and found[1] < UB:
            best_S, UB = found
        if bound is None:  # no dual bound from SCIP yet (its root unfinished): the trivial one, f(S) >= f(all)
            bound, info["bound_source"] = inst.full_objective, "trivial: f(all), SCIP had none yet"
        bound = min(bound, UB)
        info["trace"] = trace.finish(UB, bound)
        if status == "optimal":
            result_status = Status.OPTIMAL
        elif status in ("timelimit", "userinterrupt"):
            result_status = Status.TIME_LIMIT
        else:
            result_status = Status.FEASIBLE
        msg = "" if status == "optimal" else f"SCIP stopped: {status}"
        return Result(keep=best_S, status=result_status, bound=bound, info=info, message=msg)
