"""The same MIQP written in Pyomo, solved through Pyomo's solver interfaces.

Model (objective in units of |f(all)|, F scaled by 1/sqrt|f(all)|, A = H - D,
D a validated diagonal split from `exact.perspective`):

    min   sum_c eta_c + 0.5 sum_g t_g
    s.t.  eta_c >= 0.5 W_c' A W_c - F_c' W_c                   for every output column c
          sum_{i in g} D_i ||W_i||^2 <= t_g z_g,  t_g >= 0       (perspective cone)
          sum_{g in part j} z_g = budget_j,  z_g binary,  |W_ic| <= w_max z_g(i),  w_max = sqrt(2 / lambda_min(H))

MIQP backends (`backend`): "scip" = Pyomo's pyscipopt-based `scip_direct`
interface (pyomo.contrib.solver; works offline, no executable needed) or
"gurobi" = `gurobi_direct` (needs gurobipy and a license). The legacy `scip`
(AMPL executable) interface is not used: no `scip` binary ships with the
pyscipopt wheel.

Continuous relaxation through Pyomo and HiGHS (`relaxation_rounds` > 0):
z in [0, 1] and every perspective cone replaced by tangent planes
t_g >= <D w0 / z0, w_g> - 0.5 D ||w0||^2 / z0^2 z_g at the root relaxation
points, a convex QP solved by HiGHS (Pyomo's `highs` interface), more planes
added at violated points each round. Its bound is the Fenchel bound of the
W it returns (valid for any W), used when the MIQP gives no better one.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass

import numpy as np

from osscar_opt.registry import Result, Solver, Status, register

from ._common import (
    GAP_TOL,
    SplitSolver,
    cpu_threads,
    objective_of,
    osscar_support,
    remaining,
)
from .perspective import SPLIT_METHODS, PerspectiveModel
from .relax import newton_relaxation

_BACKENDS = {"scip": ("scip_direct", "pyscipopt"), "gurobi": ("gurobi_direct", "gurobipy")}


@dataclass
class PyomoParams:
    """Parameters of the Pyomo model.

    backend: "scip" (Pyomo's pyscipopt interface) or "gurobi" (licensed).
    split: perspective split (diagonal): "optimal", "max-trace", "lambda-min" or "conditional".
    relaxation_rounds: rounds of the HiGHS QP relaxation through Pyomo (0: skip).
    feastol: the MIQP solver's feasibility tolerance.
    max_variables: skip instances whose model has more W entries (d * rank(G)).
    """

    backend: str = "scip"
    split: str = "optimal"
    relaxation_rounds: int = 2
    feastol: float = 1e-7
    gap_tol: float = GAP_TOL
    max_variables: int = 5_000
    threads: int | None = 1

    def __post_init__(self):
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}")
        if self.split not in SPLIT_METHODS:
            raise ValueError(f"split must be one of {', '.join(SPLIT_METHODS)}")
        if not 0 < self.feastol < 1e-3:
            raise ValueError("feastol must lie in (0, 1e-3)")


def _solver(name: str):
    import pyomo.environ  # noqa: F401  registers the pyomo.contrib.solver plugins
    from pyomo.contrib.solver.common.factory import SolverFactory

    return SolverFactory(name)


def backend_status(backend: str) -> tuple[bool, str]:
    """(True, "") when Pyomo can reach the backend's MIQP solver here."""
    iface, module = _BACKENDS[backend]
    if importlib.util.find_spec("pyomo") is None:
        return False, "needs pyomo: pip install 'osscar-opt[exact]'"
    if importlib.util.find_spec(module) is None:
        return False, f"Pyomo's {iface} interface needs {module}, which is not installed"
    try:
        avail = _solver(iface).available()
    except Exception as exc:  # the factory raises for unknown/unusable solvers
        return False, f"Pyomo cannot use {iface}: {exc}"
    if not avail:
        return False, f"Pyomo reports {iface} unavailable here ({avail})"
    return True, ""


def build_pyomo_model(model: PerspectiveModel, relaxed: bool = False):
    """The Pyomo ConcreteModel of the MIQP (relaxed=True: z continuous, no cones, a cut list)."""
    import pyomo.environ as pyo

    inst = model.instance
    d, r = model.F.shape
    p = inst.n_groups
    sigma = math.sqrt(-inst.full_objective)
    Fs = model.F / sigma
    lam = float(np.linalg.eigvalsh(inst.H)[0])
    w_max = math.sqrt(2.0 / lam) * (1.0 + 1e-6)
    D = model.split.diagonal()
    A = model.A
    m = pyo.ConcreteModel("osscar_miqp")
    m.G = pyo.RangeSet(0, p - 1)
    m.I = pyo.RangeSet(0, d - 1)
    m.C = pyo.RangeSet(0, r - 1)
    m.z = pyo.Var(m.G, bounds=(0, 1), domain=pyo.Reals if relaxed else pyo.Binary)
    m.W = pyo.Var(m.I, m.C, bounds=(-w_max, w_max))
    m.t = pyo.Var(m.G, bounds=(0, None))
    rows_of = {g: [int(i) for i in rows] for g, rows in enumerate(inst.group_rows)}
    m.budget = pyo.Constraint(range(model.budget.size), rule=lambda m, j: sum(m.z[g] for g in np.flatnonzero(model.parts == j)) == int(model.budget[j]))
    iu, ju = np.triu_indices(d, 1)
    nz = [(int(i), int(j), float(A[i, j])) for i, j in zip(iu, ju) if A[i, j] != 0.0]

    def column_quadratic(m, c):
        return (0.5 * sum(float(A[i, i]) * m.W[i, c] ** 2 for i in range(d)) + sum(a * m.W[i, c] * m.W[j, c] for i, j, a in nz)
                - sum(float(Fs[i, c]) * m.W[i, c] for i in range(d) if Fs[i, c] != 0.0))

    if relaxed:
        m.obj = pyo.Objective(expr=sum(column_quadratic(m, c) for c in range(r)) + 0.5 * sum(m.t[g] for g in range(p)))
        m.cuts = pyo.ConstraintList()
    else:
        m.eta = pyo.Var(m.C)
        # written as convex <= 0 (as "eta >= quadratic" SCIP receives a concave >= 0 row and stalls)
        m.objective_rows = pyo.Constraint(m.C, rule=lambda m, c: column_quadratic(m, c) - m.eta[c] <= 0)
        m.perspective = pyo.Constraint(m.G, rule=lambda m, g: sum(float(D[i]) * m.W[i, c] ** 2 for i in rows_of[g] for c in range(r)) <= m.t[g] * m.z[g])
        # z_g = 0 => W_g = 0 also as big-M rows (see exact.scip: the cone alone leaves ~1e-4 errors)
        group_of = inst.groups
        m.link_up = pyo.Constraint(m.I, m.C, rule=lambda m, i, c: m.W[i, c] <= w_max * m.z[int(group_of[i])])
        m.link_down = pyo.Constraint(m.I, m.C, rule=lambda m, i, c: -m.W[i, c] <= w_max * m.z[int(group_of[i])])
        m.obj = pyo.Objective(expr=sum(m.eta[c] for c in range(r)) + 0.5 * sum(m.t[g] for g in range(p)))
    return m


def pyomo_highs_relaxation(model: PerspectiveModel, rounds: int, start_points: list[np.ndarray], deadline: float | None) -> float:
    """The tangent-plane QP relaxation solved by HiGHS through Pyomo; the best Fenchel bound."""
    import pyomo.environ as pyo

    inst = model.instance
    d, r = model.F.shape
    sigma = math.sqrt(-inst.full_objective)
    D = model.split.diagonal()
    m = build_pyomo_model(model, relaxed=True)

    def add_cut(g: int, Wg: np.ndarray, zg: float) -> None:
        rows = inst.group_rows[g]
        zg = max(zg, 1e-6)
        grad_w = (D[rows][:, None] * Wg) / zg
        grad_z = -0.5 * float(np.sum(D[rows][:, None] * Wg * Wg)) / zg**2
        m.cuts.add(m.t[g] >= sum(float(grad_w[a, c]) * m.W[int(i), c] for a, i in enumerate(rows) for c in range(r)) + grad_z * m.z[g])

    for z0 in start_points:
        _, _, W0 = model.value(z0)
        for g, rows in enumerate(inst.group_rows):
            add_cut(g, W0[rows] / sigma, float(z0[g]))
    solver = _solver("highs")
    best = -math.inf
    for _ in range(rounds):
        left = remaining(deadline)
        if left <= 0:
            break
        res = solver.solve(m, time_limit=float(min(left, 60.0)), load_solutions=False, raise_exception_on_nonoptimal_result=False)
        try:
            res.solution_loader.load_vars()
        except Exception:  # no primal solution to read: the rounds end here
            break
        Wx = np.array([[pyo.value(m.W[i, c]) for c in range(r)] for i in range(d)])
        zx = np.array([pyo.value(m.z[g]) for g in range(inst.n_groups)])
        tx = np.array([pyo.value(m.t[g]) for g in range(inst.n_groups)])
        lb, _ = model.bound(Wx * sigma)
        best = max(best, lb)
        for g, rows in enumerate(inst.group_rows):
            val = 0.5 * float(np.sum(D[rows][:, None] * Wx[rows] ** 2))
            persp = val / zx[g] if zx[g] > 1e-12 else (math.inf if val > 0 else 0.0)
            if persp > tx[g] + 1e-7 * (1.0 + abs(persp)):
                add_cut(g, Wx[rows], float(zx[g]))
    return best


@register
class PyomoMiqp(SplitSolver, Solver):
    name = "pyomo"
    exact = True
    requires = ("pyomo",)
    devices = ("cpu",)
    Params = PyomoParams
    description = "the MIQP in Pyomo via its SCIP (pyscipopt) or Gurobi interface; HiGHS QP relaxation via Pyomo"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, reason = super().available()
        if not ok:
            return ok, reason
        reasons = []
        for backend in _BACKENDS:
            ok, why = backend_status(backend)
            if ok:
                return True, ""
            reasons.append(why)
        return False, "no MIQP solver reachable through Pyomo: " + "; ".join(reasons)

    def skip(self, instance, params):
        ok, why = backend_status(params.backend)
        if not ok:
            return True, why
        return super().skip(instance, params)

    def prepare(self, instance, params, device):
        F, model = self.perspective_model(instance, params)
        with cpu_threads(params.threads):
            pm = build_pyomo_model(model)
        return {"instance": instance, "F": F, "model": model, "pyomo": pm}

    def _run(self, state, params, deadline):
        import pyomo.environ as pyo

        from .scip import start_values

        inst, F, model, pm = state["instance"], state["F"], state["model"], state["pyomo"]
        full = inst.full_objective
        unit = -full
        info: dict = {"backend": params.backend, "split": model.split.method}
        S0 = osscar_support(inst, "cpu", deadline)
        UB, best_S = objective_of(inst, F, S0), S0
        bound = -math.inf
        if params.relaxation_rounds > 0:
            t0 = time.perf_counter()
            trace: list = []
            lb_newton, z_root = newton_relaxation(model, deadline, trace)
            lb = pyomo_highs_relaxation(model, params.relaxation_rounds, [z_root], deadline)
            info["relaxation"] = {"err_bound": (lb - full) / unit if math.isfinite(lb) else None, "seconds": time.perf_counter() - t0}
            bound = max(bound, lb)
        # warm start at OSSCAR's support
        start = start_values(model, S0)
        d, r = F.shape
        for g in range(inst.n_groups):
            pm.z[g].set_value(float(start["z"][g]))
            pm.t[g].set_value(float(start["t"][g]))
        for i in range(d):
            for c in range(r):
                pm.W[i, c].set_value(float(start["W"][i, c]))
        for c in range(r):
            pm.eta[c].set_value(float(start["eta"][c]))
        iface = _BACKENDS[params.backend][0]
        solver = _solver(iface)
        left = remaining(deadline)
        if params.backend == "scip":
            # few root separation rounds: SCIP otherwise loops on cone cuts at the root (seen: 60 s on 9 groups)
            options = {"numerics/feastol": params.feastol, "limits/absgap": params.gap_tol, "separating/maxroundsroot": 10}
        else:
            options = {"FeasibilityTol": params.feastol}
        kwargs = {"load_solutions": False, "raise_exception_on_nonoptimal_result": False, "solver_options": options}
        if params.backend == "scip":
            kwargs["warmstart_discrete_vars"] = True
        if math.isfinite(left):
            kwargs["time_limit"] = max(0.05, left - 0.1)
        status = Status.TIME_LIMIT
        if left > 0:
            res = solver.solve(pm, **kwargs)
            tc = str(res.termination_condition).split(".")[-1]
            info["termination"] = tc
            ob = res.objective_bound
            if ob is not None and math.isfinite(ob) and abs(ob) < 1e20:
                bound = max(bound, ob * unit - 10 * params.feastol * unit)
            try:
                res.solution_loader.load_vars()
                S = np.flatnonzero(np.array([pyo.value(pm.z[g]) for g in range(inst.n_groups)]) > 0.5)
                if S.size == inst.keep:
                    val = objective_of(inst, F, S)
                    if val < UB:
                        UB, best_S = val, S
            except Exception:  # no incumbent from the MIQP: OSSCAR's stands
                pass
            if tc == "convergenceCriteriaSatisfied":
                status = Status.OPTIMAL
            elif tc in ("maxTimeLimit", "interrupted"):
                status = Status.TIME_LIMIT
            else:
                status = Status.FEASIBLE
        bound = min(bound, UB) if math.isfinite(bound) else None
        msg = "" if status == Status.OPTIMAL else f"{iface} ended with {info.get('termination', 'no time left')}"
        return Result(keep=best_S, status=status, bound=bound, info=info, message=msg)
