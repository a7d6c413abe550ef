"""The quadratic subset-selection instance (DESIGN.md section 1).

A layer with input activations X (n x d) and weights W_hat (d x m, rows are
input features) gives

    H = X'X/n + damping * mean(diag(X'X/n)) * I      (d x d, SPD)
    G = H W_hat
    f(S) = min_{W: rows outside S are 0} 0.5 tr(W'HW) - tr(G'W)
         = -0.5 tr(G_S' H_SS^-1 G_S)

and the task is to minimize f(S) over sets S of exactly `keep` groups of rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InstanceError

# Relative asymmetry of H tolerated (round-off) before H is called non-symmetric.
SYMMETRY_TOL = 1e-10


@dataclass(frozen=True)
class Partition:
    """A part id per group and the number of groups to keep in each part.

    Used for side constraints such as GQA: the query heads of a layer are
    partitioned by their KV group and every KV group keeps the same number.
    """

    parts: np.ndarray  # (p,) int64, part id of each group, ids 0..n_parts-1
    budget: np.ndarray  # (n_parts,) int64, groups kept in each part

    @property
    def n_parts(self) -> int:
        return int(self.budget.shape[0])

    def part_sizes(self) -> np.ndarray:
        return np.bincount(self.parts, minlength=self.n_parts)

    def to_dict(self) -> dict:
        return {"parts": self.parts.tolist(), "budget": self.budget.tolist()}


def _even_budget(sizes: np.ndarray, keep: int) -> np.ndarray:
    n_parts = len(sizes)
    if n_parts == 0:
        raise InstanceError("partition has no parts: give a part id for every group")
    if np.all(sizes == sizes[0]) and keep % n_parts == 0:
        return np.full(n_parts, keep // n_parts, dtype=np.int64)
    if keep == int(sizes.sum()):
        return sizes.astype(np.int64)
    if keep == 0:
        return np.zeros(n_parts, dtype=np.int64)
    raise InstanceError(
        f"keep={keep} cannot be split evenly over {n_parts} parts of sizes "
        f"{sizes.tolist()}: choose keep as a multiple of {n_parts} or pass "
        "partition=(parts, budget) with an explicit budget per part"
    )


def make_partition(partition: Any, n_groups: int, keep: int) -> Partition | None:
    """Normalize the accepted forms of a partition into a validated Partition.

    Accepted: None; a Partition; an array of part ids (budget derived evenly);
    a (parts, budget) pair; a mapping {"parts": ..., "budget": ...}.
    """
    if partition is None:
        return None
    budget = None
    if isinstance(partition, Partition):
        parts, budget = partition.parts, partition.budget
    elif isinstance(partition, Mapping):
        parts, budget = partition.get("parts"), partition.get("budget")
    elif isinstance(partition, tuple) and len(partition) == 2:
        parts, budget = partition
    else:
        parts = partition
    parts = np.asarray(parts)
    if parts.ndim != 1 or parts.shape[0] != n_groups:
        raise InstanceError(
            f"partition has {parts.size} entries but there are {n_groups} groups: "
            "give one part id per group"
        )
    if not np.issubdtype(parts.dtype, np.integer):
        if not np.all(np.isfinite(parts)) or not np.all(parts == np.round(parts)):
            raise InstanceError("partition part ids must be integers 0..n_parts-1")
        parts = parts.astype(np.int64)
    parts = parts.astype(np.int64)
    if parts.min(initial=0) < 0:
        raise InstanceError("partition part ids must be integers 0..n_parts-1, got a negative id")
    n_parts = int(parts.max(initial=-1)) + 1
    sizes = np.bincount(parts, minlength=n_parts)
    if np.any(sizes == 0):
        missing = np.flatnonzero(sizes == 0).tolist()
        raise InstanceError(f"partition part ids must be 0..n_parts-1 without gaps; parts {missing} are empty")
    if budget is None:
        budget = _even_budget(sizes, keep)
    budget = np.asarray(budget)
    if budget.ndim != 1 or budget.shape[0] != n_parts:
        raise InstanceError(
            f"partition budget has {budget.size} entries for {n_parts} parts: give one budget per part"
        )
    if not np.all(budget == np.round(budget)):
        raise InstanceError("partition budgets must be integers")
    budget = budget.astype(np.int64)
    if np.any(budget < 0) or np.any(budget > sizes):
        raise InstanceError(
            f"partition budget {budget.tolist()} is infeasible for part sizes {sizes.tolist()}: "
            "each budget must lie in [0, part size]"
        )
    if int(budget.sum()) != keep:
        raise InstanceError(
            f"partition budgets sum to {int(budget.sum())} but keep={keep}: make the budgets sum to keep"
        )
    return Partition(parts=parts, budget=budget)


def _as_matrix(name: str, a: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(a, torch.Tensor):
            a = a.detach().to("cpu", torch.float64).numpy()
    except ImportError:  # pragma: no cover
        pass
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InstanceError(f"{name} is not a numeric array ({exc}): pass a numpy array of floats") from None
    return arr


def _check_finite(name: str, a: np.ndarray) -> None:
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0].tolist()
        raise InstanceError(
            f"{name} contains NaN or Inf (first at index {tuple(bad)}): "
            "repair the data (e.g. recompute the Gram matrix in float64) before building the instance"
        )


def _groups_from(d: int, group_size: Any, groups: Any) -> tuple[np.ndarray, int | None]:
    if groups is not None:
        g = np.asarray(groups)
        if g.ndim != 1 or g.shape[0] != d:
            raise InstanceError(
                f"groups has {g.size} entries but d={d}: give one group id per row of H and W"
            )
        if g.size and not np.issubdtype(g.dtype, np.integer):
            if not np.all(np.isfinite(g)) or not np.all(g == np.round(g)):
                raise InstanceError("groups must be integer group ids 0..p-1")
        g = g.astype(np.int64)
        if g.size and g.min() < 0:
            raise InstanceError("groups must be integer group ids 0..p-1, got a negative id")
        p = int(g.max(initial=-1)) + 1
        counts = np.bincount(g, minlength=p)
        if np.any(counts == 0):
            missing = np.flatnonzero(counts == 0)[:5].tolist()
            raise InstanceError(
                f"groups do not tile the rows: group ids must be 0..p-1 with every id used; ids {missing} have no rows"
            )
        if group_size is not None:
            expected = np.repeat(np.arange(d // int(group_size)), int(group_size)) if d % int(group_size) == 0 else None
            if expected is None or not np.array_equal(expected, g):
                raise InstanceError("give either group_size or groups, not both (they disagree)")
        uniform = None
        if p and np.all(counts == counts[0]):
            b = int(counts[0])
            if np.array_equal(g, np.repeat(np.arange(p), b)):
                uniform = b
        return g, uniform
    b = 1 if group_size is None else group_size
    if isinstance(b, bool) or not float(b).is_integer() or int(b) < 1:
        raise InstanceError(f"group_size must be a positive integer, got {group_size!r}")
    b = int(b)
    if d % b:
        raise InstanceError(
            f"group_size={b} does not divide d={d}: groups must tile the rows; pass groups= for uneven groups"
        )
    return np.repeat(np.arange(d // b, dtype=np.int64), b), b


class Instance:
    """A quadratic subset-selection instance: keep `keep` groups of rows.

    Parameters
    ----------
    H : (d, d) array, the damped Gram matrix (symmetric positive definite).
    W : (d, m) array, the original weights W_hat, rows are input features.
    keep : number of groups to keep, 0 <= keep <= p.
    group_size : uniform contiguous groups of this many rows (default 1).
    groups : alternatively a length-d array giving the group id of every row.
    partition : optional side constraint, a part id per group (budget derived
        evenly), a (parts, budget) pair, a mapping or a Partition.
    meta : provenance (model, layer, structure, calibration set, tokens,
        damping); must be JSON-serializable to be saved.
    """

    def __init__(
        self,
        H: Any,
        W: Any,
        keep: int,
        group_size: int | None = None,
        groups: Sequence[int] | np.ndarray | None = None,
        partition: Any = None,
        meta: Mapping[str, Any] | None = None,
    ):
        H = _as_matrix("H", H)
        W = _as_matrix("W", W)
        if H.ndim != 2 or H.shape[0] != H.shape[1]:
            raise InstanceError(f"H must be a square d x d matrix, got shape {H.shape}")
        d = H.shape[0]
        if d == 0:
            raise InstanceError("H is empty (d=0): an instance needs at least one row")
        if W.ndim == 1:
            W = W[:, None]
        if W.ndim != 2 or W.shape[0] != d:
            raise InstanceError(
                f"W must be d x m with d={d} rows (one per input feature), got shape {W.shape}; "
                "for a torch Linear layer pass weight.T"
            )
        if W.shape[1] == 0:
            raise InstanceError("W has no columns (m=0): nothing to reconstruct")
        _check_finite("H", H)
        _check_finite("W", W)
        scale = float(np.max(np.abs(H)))
        asym = float(np.max(np.abs(H - H.T)))
        if asym > SYMMETRY_TOL * max(scale, 1e-300):
            raise InstanceError(
                f"H is not symmetric (max |H - H'| = {asym:.3g}, max |H| = {scale:.3g}): "
                "pass (H + H.T) / 2 if the asymmetry is round-off"
            )
        self.H = np.ascontiguousarray((H + H.T) * 0.5)
        self.W = np.ascontiguousarray(W)
        self.groups, self.group_size = _groups_from(d, group_size, groups)
        self.n_groups = int(self.groups.max()) + 1
        if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)):
            if isinstance(keep, float) and keep.is_integer():
                keep = int(keep)
            else:
                raise InstanceError(f"keep must be an integer number of groups, got {keep!r}")
        keep = int(keep)
        if not 0 <= keep <= self.n_groups:
            raise InstanceError(
                f"keep={keep} is out of range: it must lie in [0, {self.n_groups}] (the number of groups)"
            )
        self.keep = keep
        self.partition = make_partition(partition, self.n_groups, keep)
        self.meta = dict(meta or {})
        # Positive definiteness: a Cholesky factorization must succeed.
        try:
            np.linalg.cholesky(self.H)
        except np.linalg.LinAlgError:
            raise InstanceError(
                "H is not positive definite (Cholesky failed): add damping, e.g. "
                "H + 0.01 * mean(diag(H)) * I, or build it with Instance.from_activations(..., damping=0.01)"
            ) from None
        # f(all groups) = -0.5 tr(W'HW): the objective when nothing is pruned.
        self.full_objective = -0.5 * float(np.einsum("ij,ij->", self.W, self.H @ self.W))
        if not self.full_objective < 0:
            raise InstanceError("W is all zero: there is nothing to reconstruct, every support is optimal")

    # ------------------------------------------------------------------ sizes
    @property
    def d(self) -> int:
        return self.H.shape[0]

    @property
    def m(self) -> int:
        return self.W.shape[1]

    @property
    def p(self) -> int:
        return self.n_groups

    @cached_property
    def group_sizes(self) -> np.ndarray:
        return np.bincount(self.groups, minlength=self.n_groups)

    @cached_property
    def group_rows(self) -> list[np.ndarray]:
        """Row indices of every group, in increasing order."""
        order = np.argsort(self.groups, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(self.group_sizes)])
        return [order[bounds[g] : bounds[g + 1]] for g in range(self.n_groups)]

    def rows_of(self, group_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Sorted row indices of the given groups."""
        ids = np.asarray(group_ids, dtype=np.int64)
        if ids.size == 0:
            return np.zeros(0, dtype=np.int64)
        if self.group_size is not None:
            b = self.group_size
            return np.sort((ids[:, None] * b + np.arange(b)[None, :]).ravel())
        return np.sort(np.concatenate([self.group_rows[g] for g in ids]))

    # ----------------------------------------------------------- derivations
    def with_keep(self, keep: int, budget: Sequence[int] | None = None) -> "Instance":
        """The same instance with another `keep` (partition budgets re-derived)."""
        partition = None
        if self.partition is not None:
            partition = (self.partition.parts, budget) if budget is not None else self.partition.parts
        return self._derive(keep=keep, partition=partition)

    def without_partition(self) -> "Instance":
        """The same instance without its side constraint (a relaxation)."""
        return self._derive(partition=None)

    def keep_for_sparsity(self, sparsity: float) -> int:
        """Number of groups kept when a fraction `sparsity` of them is pruned."""
        if not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) <= 1.0):
            raise InstanceError(f"sparsity must lie in [0, 1], got {sparsity!r}")
        return int(round((1.0 - float(sparsity)) * self.n_groups))

    def crop(self, group_ids: Sequence[int] | np.ndarray, keep: int | None = None) -> "Instance":
        """The sub-instance on the given groups (renumbered in the given order).

        `keep` defaults to the same fraction of groups as this instance, rounded.
        A partition is carried over with budgets re-derived evenly.
        """
        ids = np.asarray(group_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise InstanceError("crop needs a non-empty 1-D list of group ids")
        if ids.min() < 0 or ids.max() >= self.n_groups:
            raise InstanceError(f"crop group ids must lie in [0, {self.n_groups - 1}]")
        if np.unique(ids).size != ids.size:
            raise InstanceError("crop group ids contain duplicates")
        rows = np.concatenate([self.group_rows[g] for g in ids])
        new_groups = np.concatenate([np.full(self.group_sizes[g], i) for i, g in enumerate(ids)])
        if keep is None:
            keep = int(round(self.keep * ids.size / self.n_groups))
        partition = None
        if self.partition is not None:
            old = self.partition.parts[ids]
            _, parts = np.unique(old, return_inverse=True)
            partition = parts
        meta = dict(self.meta)
        meta["crop_of"] = {"groups": ids.tolist(), "source": self.meta.get("id")}
        return Instance(
            self.H[np.ix_(rows, rows)],
            self.W[rows],
            keep,
            groups=new_groups,
            partition=partition,
            meta=meta,
        )

    def _derive(self, **changes: Any) -> "Instance":
        args = dict(
            H=self.H,
            W=self.W,
            keep=self.keep,
            groups=self.groups,
            partition=self.partition,
            meta=self.meta,
        )
        args.update(changes)
        return Instance(**args)

    @classmethod
    def from_activations(
        cls,
        X: Any,
        W: Any,
        keep: int,
        group_size: int | None = None,
        groups: Sequence[int] | np.ndarray | None = None,
        partition: Any = None,
        meta: Mapping[str, Any] | None = None,
        damping: float = 0.01,
    ) -> "Instance":
        """Build H = X'X/n + damping * mean(diag(X'X/n)) I from activations X (n x d)."""
        X = _as_matrix("X", X)
        if X.ndim != 2:
            raise InstanceError(f"X must be an n x d matrix of activations, got shape {X.shape}")
        if X.shape[0] == 0:
            raise InstanceError("X has no rows: pass at least one activation vector")
        _check_finite("X", X)
        gram = X.T @ X / X.shape[0]
        H = damped_gram(gram, damping)
        meta = dict(meta or {})
        meta.setdefault("damping", float(damping))
        meta.setdefault("samples", int(X.shape[0]))
        return cls(H, W, keep, group_size=group_size, groups=groups, partition=partition, meta=meta)

    # ------------------------------------------------------------- printing
    def summary(self) -> dict:
        out = {
            "d": self.d,
            "m": self.m,
            "groups": self.n_groups,
            "group_size": self.group_size if self.group_size is not None else "varies",
            "keep": self.keep,
            "partition": None if self.partition is None else self.partition.to_dict(),
            "full_objective": self.full_objective,
        }
        return out

    def __repr__(self) -> str:
        b = self.group_size if self.group_size is not None else "varied"
        part = "" if self.partition is None else f", parts={self.partition.n_parts}"
        name = f" {self.meta['id']!r}" if "id" in self.meta else ""
        return f"<Instance{name} d={self.d} m={self.m} p={self.n_groups} group_size={b} keep={self.keep}{part}>"


DAMPING = 0.01  # the default ridge: a fraction of the Gram matrix's mean diagonal
# what a sequentially pruned layer's refit reproduces (`osscar_opt.apply`): its own dense output
# ("layer", the published mode) or the dense model's residual stream ("dense"); the default None
# picks "dense" where it applies (sequential pruning of a transformer), else "layer"
TARGETS = ("layer", "dense")
DEFAULT_TARGETS = None
# the ridge of the dense-target correction, a fraction of the mean diagonal; None (the default):
# ridge and shrinkage chosen per site by two-fold validation (`extract.fit_correction`)
TARGET_DAMPING = None
# how `osscar_opt.apply` picks an attention site's support: the solver's ("err", the default), the one
# of the solver's support and its start with the better held-out score ("validation"), or by the
# estimated change of the model's loss ("loss", `loss_select`, causal LMs only)
SELECT = ("err", "validation", "loss")


def check_damping(damping: Any) -> float:
    """The damping as a float; InstanceError unless it is a finite number >= 0."""
    if isinstance(damping, bool) or not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
        raise InstanceError(f"damping must be a finite number >= 0 (a fraction of the mean Gram diagonal, "
                            f"e.g. {DAMPING}), got {damping!r}")
    return float(damping)


def damped_gram(gram: np.ndarray, damping: float) -> np.ndarray:
    """gram + damping * mean(diag(gram)) * I, checking the damping and the scale."""
    check_damping(damping)
    scale = float(np.mean(np.diag(gram)))
    if not scale > 0:
        raise InstanceError("the activations are all zero: no input feature is ever active, nothing to fit")
    H = np.array(gram, dtype=np.float64, copy=True)
    H[np.diag_indices_from(H)] += damping * scale
    return H
