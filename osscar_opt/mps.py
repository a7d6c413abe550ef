"""Export an instance as a mixed-integer quadratic program in (free) MPS format.

The model (DESIGN.md section 1), for an instance with groups g = 1..p of rows:

    minimize    0.5 sum_j v_j' H v_j - sum_ij F_ij V_ij            (= f(S) at the optimum over V)
    subject to  sum_g z_g = keep,  sum_{g in part j} z_g = budget_j  (partition rows, if any)
                V_i. = 0 unless z_g = 1 for the group g of row i   (the formulation's linking)
                z_g in {0, 1}

with V (d x r) the weights in the output coordinates below and v_j its columns.
For every fixed z the minimum over V is exactly f(S) = -0.5 tr(G_S' H_SS^-1 G_S)
with S = {g : z_g = 1}; no constant term is needed. With objective="err" the
objective is divided by -f(all) and the constant 1 is added, so that it equals
err(S) = (f(S) - f(all)) / (-f(all)); the constant is written as the RHS of
the objective row (RHS = -1; HiGHS and SCIP read the objective offset as -RHS).

Output columns (exact reduction). f depends on G = H W_hat only through G G'
(DESIGN.md section 1). When m <= d, F = G and V are the layer's weights
(V = W, r = m). When m > d, G' = Q R (QR, Q'Q = I) gives F = R' (d x d,
`osscar_opt.linalg.output_factor`) with F F' = G G', so the model has r = d
columns instead of m and the same optimal value for every support; its
variables are the coordinates of the weights in the row space of G,
W = V Q'. Nothing is dropped, so the reduction is exact.

Formulations
------------
"bigm" (default; read by HiGHS and SCIP): linear linking rows
    V_ij - u_ij z_g <= 0,   V_ij - l_ij z_g >= 0.
  SCIP solves the MIQP; HiGHS has no MIQP solver, but solves the file's QPs
  with z relaxed or fixed (its continuous relaxation, or f(S) of a support).
  Derivation of valid bounds. Write q(V) = 0.5 tr(V'HV) - tr(F'V)
  = 0.5 tr((V - V0)' H (V - V0)) + f(all) with V0 = H^-1 F (= W_hat when
  m <= d). For any support S the optimal V_S satisfies q(V_S) = f(S) <= U,
  where U = 0 = q(0) always holds (an empty support is no better), or U is the
  objective of a known feasible support (`incumbent`; then the bound is valid
  for every support at least as good, in particular the optimal one). Hence
  0.5 tr((V_S - V0)' H (V_S - V0)) <= U - f(all) =: Delta, so every column x
  of V_S - V0 has x'Hx <= 2 Delta, and by Cauchy-Schwarz in the H-norm
  |x_i| = |(H^-1/2 e_i)'(H^1/2 x)| <= sqrt(2 Delta (H^-1)_ii) =: rho_i. So
    l_ij = min(0, V0_ij - rho_i) <= V_S,ij <= max(0, V0_ij + rho_i) = u_ij,
  which are also written as variable bounds. With the default U = 0 the bounds
  hold for the optimal weights of every support, so fixing z to any support
  and solving the QP gives exactly f(S).
"perspective" (read by SCIP, Gurobi, CPLEX; not by HiGHS, which has no
  quadratic constraints): split H = (H - D) + D with D = diag(delta) >= 0,
  H - D PSD, delta > 0 (default delta_i = (1 - 1e-6) lambda_min(H)), and
  replace the separable part by its perspective, one cone per group:
    minimize 0.5 sum_j v_j'(H - D) v_j - sum_ij F_ij V_ij + 0.5 sum_g t_g
    s.t.     sum_{i in g} delta_i ||V_i.||^2 - t_g z_g <= 0   (QCMATRIX row qc<g>),
             0 <= t_g <= sum_{i in g} delta_i sum_j max(l_ij^2, u_ij^2).
  z_g = 1 gives t_g = sum delta_i ||V_i.||^2 at the optimum, recovering the
  objective; the cones make the continuous relaxation the perspective one.
  The big-M rows and bounds above are kept as well: a quadratic constraint
  alone forces V_g = 0 for z_g = 0 only up to the solver's feasibility
  tolerance eps (||V_g||^2 <= eps / delta, enough to move the objective in
  the 5th digit), the linear rows force it exactly; the bounds on V and t
  also give a spatial branch-and-bound finite boxes for the bilinear t_g z_g.
  Pass the SDP-chosen diagonal of the relaxation solvers as `diagonal` for a
  tighter model.

Names: z<g> (binary), w<i>_<j> (row i of the instance, output column j),
t<g>; rows obj, card, part<j>, ub<i>_<j>, lb<i>_<j>, qc<g>. The quadratic
objective is a QUADOBJ section (upper triangle, objective 0.5 x'Qx). The file
is written to a temporary file in the target directory and moved into place
with os.replace, so a failure never leaves a partial file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import scipy.linalg
import torch

from .errors import InstanceError
from .instance import Instance
from .io import atomic_write
from .linalg import output_factor

FORMULATIONS = ("bigm", "perspective")
OBJECTIVES = ("f", "err")
MAX_ENTRIES = 20_000_000


@dataclass(frozen=True)
class MpsModel:
    """What `write_mps` wrote."""

    path: Path
    formulation: str
    objective: str  # "f" or "err"
    columns: int  # r, output columns in the model (m, or d when m > d)
    variables: int
    rows: int  # constraints, the objective row excluded
    quadratic_terms: int  # QUADOBJ (+ QCMATRIX) entries
    bound_objective: float  # U of the big-M bounds: valid for every support with f(S) <= U


def _reduced(instance: Instance) -> tuple[np.ndarray, np.ndarray]:
    """(F, V0): F F' = G G' with r <= min(d, m) columns, V0 = H^-1 F."""
    G = instance.H @ instance.W
    if instance.m > instance.d:
        F = output_factor(torch.as_tensor(G, dtype=torch.float64)).numpy()
        V0 = scipy.linalg.cho_solve(scipy.linalg.cho_factor(instance.H, lower=True), F)
        return np.ascontiguousarray(F), V0
    return G, instance.W


def bigm_bounds(instance: Instance, incumbent: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(lower, upper, U): l_ij <= V_S,ij <= u_ij for the optimal weights of every support with f(S) <= U.

    See the module docstring for the derivation; U = 0 (every support) unless
    `incumbent` gives the objective f of a known feasible support.
    """
    U = _bound_objective(instance, incumbent)
    return (*_bounds(instance, _reduced(instance)[1], U), U)


def _bound_objective(instance: Instance, incumbent: float | None) -> float:
    """U: 0 (valid for every support) or a checked incumbent objective."""
    U = 0.0 if incumbent is None else float(incumbent)
    if not np.isfinite(U) or U > 0.0:
        raise InstanceError(f"incumbent must be a finite objective value f(S) <= 0, got {incumbent!r}")
    if U < instance.full_objective:
        raise InstanceError(
            f"incumbent {U:.12g} is below f(all) = {instance.full_objective:.12g}, which no support beats: "
            "pass the objective f(S) of a feasible support (Solution.objective)"
        )
    return U


def _bounds(instance: Instance, V0: np.ndarray, U: float) -> tuple[np.ndarray, np.ndarray]:
    """(l, u) = (min(0, V0 - rho), max(0, V0 + rho)), rho_i = sqrt(2 (U - f(all)) (H^-1)_ii)."""
    delta = U - instance.full_objective
    L = scipy.linalg.cholesky(instance.H, lower=True)
    Linv = scipy.linalg.solve_triangular(L, np.eye(instance.d), lower=True)
    hinv_diag = np.einsum("ki,ki->i", Linv, Linv)  # (H^-1)_ii = ||L^-1 e_i||^2
    rho = np.sqrt(2.0 * delta * hinv_diag)[:, None]
    return np.minimum(0.0, V0 - rho), np.maximum(0.0, V0 + rho)


def perspective_diagonal(instance: Instance, diagonal: Any = None) -> np.ndarray:
    """delta (d,) with delta > 0 and H - diag(delta) PSD (checked); default (1 - 1e-6) lambda_min(H)."""
    H = instance.H
    if diagonal is None:
        lam = float(scipy.linalg.eigh(H, eigvals_only=True, subset_by_index=[0, 0])[0])
        return np.full(instance.d, (1.0 - 1e-6) * lam)
    delta = np.asarray(diagonal, dtype=np.float64)
    if delta.ndim == 0:
        delta = np.full(instance.d, float(delta))
    if delta.shape != (instance.d,) or not np.all(np.isfinite(delta)):
        raise InstanceError(f"diagonal must hold d={instance.d} finite numbers, got shape {delta.shape}")
    if np.any(delta <= 0):
        raise InstanceError(
            "diagonal must be > 0 on every row, otherwise z_g = 0 does not force the group's weights to 0: "
            "use a positive diagonal (default: lambda_min(H))"
        )
    lam = float(scipy.linalg.eigh(H - np.diag(delta), eigvals_only=True, subset_by_index=[0, 0])[0])
    tol = 1e-12 * float(np.max(np.abs(np.diag(H))))
    if lam < -tol:
        raise InstanceError(
            f"H - diag(diagonal) is not positive semidefinite (smallest eigenvalue {lam:.3g}): "
            "shrink the diagonal, e.g. to lambda_min(H)"
        )
    return delta


def _num(x: float) -> str:
    return repr(float(x))


def _quad_template(Q: np.ndarray, scale: float) -> tuple[str, int]:
    """QUADOBJ lines of 0.5 v'Qv for one output column; '@' stands for the column index."""
    a, b = np.triu_indices(Q.shape[0])
    vals = Q[a, b] * scale
    nz = vals != 0
    lines = [f"    w{i}_@ w{k}_@ {_num(v)}\n" for i, k, v in zip(a[nz].tolist(), b[nz].tolist(), vals[nz].tolist())]
    return "".join(lines), len(lines)


def write_mps(
    instance: Instance,
    path: str | os.PathLike,
    formulation: str = "bigm",
    *,
    objective: str = "f",
    incumbent: float | None = None,
    diagonal: Any = None,
    max_entries: int = MAX_ENTRIES,
) -> MpsModel:
    """Write the instance's MIQP to `path` (free MPS) atomically; see the module docstring.

    formulation: "bigm" (HiGHS and SCIP read it) or "perspective" (quadratic
        constraints: SCIP, Gurobi, CPLEX).
    objective: "f" (the file's objective is f(S)) or "err" (err(S), with the
        constant 1 as the objective offset).
    incumbent: objective f of a known feasible support; tightens the big-M
        bounds (then valid for every support at least as good, so the MIQP
        optimum is kept but fixing z to a worse support may be infeasible).
    diagonal: the perspective's D (scalar or length d), default lambda_min(H).
    max_entries: refuse models with more coefficient lines than this.
    """
    if not isinstance(instance, Instance):
        raise InstanceError(f"write_mps expects an Instance, got {type(instance).__name__}")
    if formulation not in FORMULATIONS:
        raise InstanceError(f"unknown formulation {formulation!r}: choose one of {', '.join(FORMULATIONS)}")
    if objective not in OBJECTIVES:
        raise InstanceError(f"unknown objective {objective!r}: choose 'f' (f(S)) or 'err' (err(S))")
    if diagonal is not None and formulation != "perspective":
        raise InstanceError("diagonal is the perspective split H = (H - D) + D: use it with formulation='perspective'")
    path = Path(path)
    d, p = instance.d, instance.n_groups
    r = min(instance.m, d)
    nnz_upper = int(np.count_nonzero(np.triu(instance.H)))
    entries = r * nnz_upper + 3 * d * r + 2 * p
    if entries > max_entries:
        raise InstanceError(
            f"the MPS model would have about {entries:,} coefficient lines (d={d}, {r} output columns, "
            f"dense H): crop the instance (Instance.crop) or pass max_entries={entries}"
        )
    U = _bound_objective(instance, incumbent)
    F, V0 = _reduced(instance)
    scale = 1.0 if objective == "f" else 1.0 / (-instance.full_objective)
    groups = instance.groups
    delta = None
    lower, upper = _bounds(instance, V0, U)
    if formulation == "bigm":
        Q = instance.H
    else:
        delta = perspective_diagonal(instance, diagonal)
        Q = instance.H - np.diag(delta)
        # t_g <= sum_{i in g} delta_i ||V_i.||^2 is bounded through the same valid bounds on V
        t_upper = np.bincount(groups, weights=delta * np.maximum(lower**2, upper**2).sum(1), minlength=p)
    template, per_column = _quad_template(Q, scale)

    def body() -> Iterable[str]:
        part = instance.partition
        yield "* osscar-opt MIQP export (osscar_opt.mps): minimize the objective below over V and z\n"
        yield (f"* id={instance.meta.get('id', '-')} d={d} m={instance.m} output_columns={r} p={p} "
               f"keep={instance.keep} formulation={formulation} objective={objective}\n")
        yield f"* f(all)={_num(instance.full_objective)}\n"
        if instance.m > d:
            yield "* output columns reduced exactly: variables are coordinates in the row space of G (W = V Q')\n"
        yield f"* big-M bounds valid for every support with f(S) <= {_num(U)}\n"
        yield "NAME osscar\nROWS\n N obj\n E card\n"
        if part is not None:
            yield "".join(f" E part{j}\n" for j in range(part.n_parts))
        for i in range(d):
            yield "".join(f" L ub{i}_{j}\n G lb{i}_{j}\n" for j in range(r))
        if formulation == "perspective":
            yield "".join(f" L qc{g}\n" for g in range(p))
        yield "COLUMNS\n    MARKER 'MARKER' 'INTORG'\n"
        rows_of = instance.group_rows
        for g in range(p):
            out = [f"    z{g} card 1\n"]
            if part is not None:
                out.append(f"    z{g} part{int(part.parts[g])} 1\n")
            for i in rows_of[g].tolist():
                for j in range(r):
                    if upper[i, j] != 0:
                        out.append(f"    z{g} ub{i}_{j} {_num(-upper[i, j])}\n")
                    if lower[i, j] != 0:
                        out.append(f"    z{g} lb{i}_{j} {_num(-lower[i, j])}\n")
            yield "".join(out)
        yield "    MARKER 'MARKER' 'INTEND'\n"
        for i in range(d):
            c = (-scale * F[i]).tolist()
            yield "".join(
                f"    w{i}_{j} obj {_num(c[j])}\n    w{i}_{j} ub{i}_{j} 1\n    w{i}_{j} lb{i}_{j} 1\n"
                for j in range(r)
            )
        if formulation == "perspective":
            yield "".join(f"    t{g} obj {_num(0.5 * scale)}\n" for g in range(p))
        yield "RHS\n"
        yield f"    rhs card {instance.keep}\n"
        if part is not None:
            yield "".join(f"    rhs part{j} {int(b)}\n" for j, b in enumerate(part.budget))
        if objective == "err":
            yield "    rhs obj -1\n"  # objective offset = -RHS = +1
        yield "BOUNDS\n"
        yield "".join(f" BV bnd z{g}\n" for g in range(p))
        for i in range(d):
            lo, up = lower[i].tolist(), upper[i].tolist()
            yield "".join(f" LO bnd w{i}_{j} {_num(lo[j])}\n UP bnd w{i}_{j} {_num(up[j])}\n" for j in range(r))
        if formulation == "perspective":
            yield "".join(f" UP bnd t{g} {_num(t_upper[g])}\n" for g in range(p))
        yield "QUADOBJ\n"
        for j in range(r):
            yield template.replace("@", str(j))
        if formulation == "perspective":
            for g in range(p):
                rows = rows_of[g].tolist()
                out = [f"QCMATRIX qc{g}\n"]
                for i in rows:
                    out.extend(f"    w{i}_{j} w{i}_{j} {_num(delta[i])}\n" for j in range(r))
                out.append(f"    z{g} t{g} -0.5\n    t{g} z{g} -0.5\n")
                yield "".join(out)
        yield "ENDATA\n"

    def write(fh):
        for chunk in body():
            fh.write(chunk)

    atomic_write(path, write)
    n_vars = p + d * r + (p if formulation == "perspective" else 0)
    n_rows = 1 + (0 if instance.partition is None else instance.partition.n_parts)
    n_rows += 2 * d * r + (p if formulation == "perspective" else 0)
    quad = per_column * r + (d * r + 2 * p if formulation == "perspective" else 0)
    return MpsModel(path, formulation, objective, r, n_vars, n_rows, quad, U)
