"""Our own branch and bound over groups with perspective-relaxation bounds.

Solves  min f(S) = -0.5 tr(F_S' H_SS^-1 F_S)  over supports S of `keep`
groups (a budget per part with a partition) exactly:

* root: OSSCAR's support as the incumbent; the diagonal perspective split
  D that maximizes the root relaxation bound (`exact.perspective`, split
  "optimal"; "max-trace" and "lambda-min" are available).
* nodes (best-first on the bound, deeper first on ties): fix groups in/out;
  the node's perspective relaxation is minimized by a projected Newton method
  (`exact.relaxation`: numpy and LAPACK on the CPU, torch on CUDA)
  warm-started from the parent; its bound is the Fenchel bound LB(W), valid
  for every iterate (no convergence needed).
  A node whose relaxation value c(z) is already below the incumbent cannot be
  pruned and is branched after a couple of steps.
* bound tightening: from the node's best W, the bound of each child "g
  forced in" / "g forced out" is available in closed form (swap q_g with the
  boundary q in the top selection); a group whose child bound reaches the
  incumbent is fixed the other way, and the node is re-solved.
* per-node splits: at depths 1..reoptimize_depth the bound-maximizing
  diagonal is recomputed for the node's own rows and fixings (a smaller
  principal submatrix leaves room for a larger D; groups fixed in need none)
  and inherited by the subtree; every node rescales its D to its rows.
  On the 60-neuron crop of layer 10 this cut the tree from 24.8k to 14.5k
  nodes; the optimal diagonal is ~50 Newton steps (~20-40 ms), so it is only
  worth it near the root. Deeper down (instances of 80 groups or more),
  every third depth refines the inherited diagonal by 4 quick Newton steps
  from the parent's D and z (about 6 ms on 100 rows). On the 100-neuron
  crops of SmolLM2 layers 25, 20 and 15 (two workers) this cuts the trees
  3-5x (12.9k -> 2.7k, 22.6k -> 6.7k, 43.6k -> 11.4k nodes) and the time
  about 2x (38 -> 21 s, 50 -> 31 s, 85 -> 41 s); after 600 s on MiniLM
  layers 1 and 2 it leaves 0.56% and 0.096% gaps instead of 1.73% and
  1.75%. On the 60-neuron crops it shrinks the trees by a third but not
  the time, so it is off below 80 groups.
* incumbents: rounding of the relaxation (top z per part) at every node and
  OSSCAR restricted to the node's fixings (as a partition) at nodes 1, 2, 4, 8, ...
* workers > 1: the open nodes are searched by several processes (shares
  dealt out in bound order, sent back after a time slice and dealt out again).
* reliability branching: pseudocosts (bound gain per unit change of z_g,
  measured on every child and in every worker) scored by the product rule,
  with strong branching (a few Newton steps per child) on candidates whose
  pseudocosts are not yet reliable; the chosen children keep their
  strong-branching bound and iterate as priority and warm start (one
  worker: 10-13% less time on the 100-neuron crops of SmolLM2 layers 25 and
  20; on T1 with two workers the total stays within the run-to-run spread
  of tree sizes, 229 s against 219 s). On the 60-neuron crops of SmolLM2 layer
  10 and MiniLM layer 3 it halves the tree against the most fractional z
  (19.1k -> 9.0k and 28.2k -> 14.5k nodes); "fractional" and "pseudocost"
  remain available.

The reported bound is min(incumbent, smallest bound of the nodes pruned or
still open): valid at any time. OPTIMAL means the gap is below gap_tol
(in err units, default 1e-9).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from osscar_opt.instance import Instance
from osscar_opt.registry import Result, Solver, Status, register

from ._common import (
    GAP_TOL,
    Trace,
    cpu_threads,
    objective_of,
    osscar_support,
    output_factor,
    parts_and_budget,
    restricted_osscar,
    worker_pool,
)
from .perspective import SPLIT_METHODS, optimal_diagonal, split_for
from .relaxation import NodeRelaxation, RootData


BRANCHING = ("reliability", "pseudocost", "fractional")
# the default refines deep diagonals from this many groups on (see BnbParams.reoptimize_every)
AUTO_REFINE_GROUPS = 80


@dataclass
class BnbParams:
    """Parameters of the branch and bound.

    split: perspective split, "optimal" (bound-maximizing diagonal, default),
        "max-trace" (largest trace, cvxpy-free Newton), "lambda-min" or
        "conditional" (t / diag(H^-1)).
    gap_tol: optimality tolerance in err units (relative to -f(all)).
    max_newton: projected Newton steps per node solve.
    min_newton: steps taken before a node that cannot be pruned is branched.
    fixing_rounds: node re-solves after bound-tightening fixings.
    osscar_nodes: run OSSCAR restricted to the node's fixings at nodes
        1, 2, 4, ... up to this node count (0 disables).
    max_nodes: stop after this many nodes (None: no limit).
    max_groups: skip instances with more groups than this.
    threads: CPU threads for torch/BLAS during the solve (None: leave the
        process setting; small factorizations run fastest on one thread).
    reoptimize_depth: recompute the optimal diagonal at nodes of depth
        1..reoptimize_depth (0 or less: the root split everywhere).
    reoptimize_mu: final barrier weight of those recomputations.
    reoptimize_every: deeper down, refine the inherited diagonal at every depth
        divisible by this (0: never) by `refine_steps` quick Newton steps at
        mu = refine_mu from the parent's D and z (`optimal_diagonal` with
        psd_step); the node's subtree inherits the result. None (default): 3
        on instances of at least AUTO_REFINE_GROUPS = 80 groups, else 0 (on
        the 60-neuron crops it shrinks the trees by a third but not the time).
    refine_steps / refine_mu: steps and barrier weight of those refinements
        (refine_steps = 0: recompute the optimal diagonal in full instead).
        Fewer steps or a smaller mu loosen the subtree bounds (one worker,
        SmolLM2 layer-25 100-neuron crop: 2 steps 17.4k nodes, 4 steps 4.1k,
        mu = 1e-6 39.2k); 6 steps at mu = 3e-5 took 10% less time on the
        SmolLM2 layer 15/20/25 crops but left 2.68% instead of 2.03% on MiniLM
        layer 2 after 300 s, so the defaults stay at 4 and 1e-5.
    branching: "reliability" (default): pseudocosts, the bound gain per unit
        change of z_g measured on every child, scored by the product rule;
        candidates whose pseudocosts rest on fewer than `reliability`
        observations per direction are strong-branched first (which records
        observations). "pseudocost": pseudocosts alone; "fractional": the
        most fractional z.
    reliability: observations per direction before a pseudocost is trusted.
    strong_depth: strong branching at every node shallower than this (0: off).
    strong_candidates / strong_steps: candidates tried and Newton steps per child.
    workers: processes searching the tree together (CPU only; 1: this
        process alone). Worth it on instances that take more than a few
        seconds: starting the workers costs about two seconds, during which
        this process searches alone.
    slice_seconds: how long a worker searches its share of the open nodes
        before sending back what is left to be dealt out again.
    """

    split: str = "optimal"
    gap_tol: float = GAP_TOL
    max_newton: int = 30
    min_newton: int = 1
    fixing_rounds: int = 2
    osscar_nodes: int = 4096
    max_nodes: int | None = None
    max_groups: int = 512
    threads: int | None = 1
    reoptimize_depth: int = 6
    reoptimize_mu: float = 1e-6
    reoptimize_every: int | None = None
    refine_steps: int = 4
    refine_mu: float = 1e-5
    strong_depth: int = 0
    strong_candidates: int = 8
    strong_steps: int = 4
    workers: int = 1
    slice_seconds: float = 2.0
    branching: str = "reliability"
    reliability: int = 4

    def __post_init__(self):
        if self.branching not in BRANCHING:
            raise ValueError(f"branching must be one of {', '.join(BRANCHING)}")
        if int(self.reliability) < 0:
            raise ValueError("reliability must be >= 0")
        if self.split not in SPLIT_METHODS:
            raise ValueError(f"split must be one of {', '.join(SPLIT_METHODS)}")
        if not self.gap_tol >= 0:
            raise ValueError("gap_tol must be >= 0")
        if int(self.max_newton) < 1 or int(self.min_newton) < 0:
            raise ValueError("max_newton must be >= 1 and min_newton >= 0")
        every = self.reoptimize_every
        if (every is not None and int(every) < 0) or int(self.refine_steps) < 0 or int(self.strong_steps) < 1:
            raise ValueError("reoptimize_every and refine_steps must be >= 0 and strong_steps >= 1")
        if not self.refine_mu > 0:
            raise ValueError("refine_mu must be > 0")
        if int(self.workers) < 1 or not float(self.slice_seconds) > 0:
            raise ValueError("workers must be >= 1 and slice_seconds > 0")


class _Node:
    __slots__ = ("lb", "depth", "order", "fixed_in", "fixed_out", "z", "D", "branch")

    def __init__(self, lb, depth, order, fixed_in, fixed_out, z, D=None, branch=None):
        self.lb, self.depth, self.order = lb, depth, order
        self.fixed_in, self.fixed_out, self.z, self.D = fixed_in, fixed_out, z, D
        self.branch = branch  # (group, forced in, change of its z, parent's bound) or None

    def __lt__(self, other):
        return (self.lb, -self.depth, self.order) < (other.lb, -other.depth, other.order)


def _propagate(parts: np.ndarray, budget: np.ndarray, fixed_in: np.ndarray, fixed_out: np.ndarray) -> bool:
    """Fix the free groups of parts with no choice left (in place); False if infeasible."""
    for j in range(budget.size):
        in_part = parts == j
        free = in_part & ~fixed_in & ~fixed_out
        need = int(budget[j]) - int(np.sum(in_part & fixed_in))
        n_free = int(free.sum())
        if need < 0 or need > n_free:
            return False
        if need == 0:
            fixed_out |= free
        elif need == n_free:
            fixed_in |= free
    return True


@register
class BranchAndBound(Solver):
    name = "bnb"
    exact = True
    requires = ()
    devices = ("cpu", "cuda")
    Params = BnbParams
    description = "branch and bound over groups, perspective bounds by projected Newton (CPU in numpy, CUDA in torch), workers=N processes"

    def skip(self, instance, params):
        if instance.n_groups > params.max_groups:
            return True, f"{instance.n_groups} groups exceed max_groups={params.max_groups}"
        return False, ""

    def prepare(self, instance, params, device):
        F = output_factor(instance)
        return {"instance": instance, "F": F, "device": torch.device(device)}

    def run(self, state, params, deadline):
        with cpu_threads(params.threads if state["device"].type == "cpu" else None):
            return self._run(state, params, deadline)

    def _run(self, state, params, deadline):
        instance: Instance = state["instance"]
        F, dev = state["F"], state["device"]
        t_start = time.perf_counter()
        p, keep = instance.n_groups, instance.keep
        parts, budget = parts_and_budget(instance)
        full = instance.full_objective

        # incumbent: OSSCAR
        best_S = osscar_support(instance, "cpu", deadline)
        UB = objective_of(instance, F, best_S)
        if keep in (0, p) or _trivial(instance):
            info = {"nodes": 0, "osscar_err": (UB - full) / (-full)}
            return Result(keep=best_S, status=Status.OPTIMAL, bound=UB, info=info)

        split = split_for(instance, params.split, backend="newton", F=F, deadline=deadline)
        root = _root_data(instance, F, split.diagonal(), dev)
        search = _Search(instance, F, root, params, UB, best_S, deadline)
        search.trace = Trace(full, t0=t_start)
        search.info["osscar_err"] = (UB - full) / (-full)
        search.info["split"] = {"method": split.method, "seconds": split.seconds, "shrink": split.shrink}
        fi0, fo0 = np.zeros(p, bool), np.zeros(p, bool)
        _propagate(parts, budget, fi0, fo0)
        heap = [_Node(-math.inf, 0, 0, fi0, fo0, None, root.D)]
        if params.workers > 1 and dev.type == "cpu":
            heap = _Parallel(search, params, split.diagonal()).run(heap)
        else:
            heap = search.run(heap)
        info = search.info
        open_min = min((n.lb for n in heap), default=math.inf)
        bound = min(search.UB, search.pruned_min, open_min)
        info["open_nodes"] = len(heap)
        info["seconds_total"] = time.perf_counter() - t_start
        info["trace"] = search.trace.finish(search.UB, bound)
        gap_closed = bound >= search.UB - search.tol
        if gap_closed:
            status = Status.OPTIMAL
        elif search.timed_out:
            status = Status.TIME_LIMIT
        else:
            status = Status.FEASIBLE
        if gap_closed:
            msg = ""
        elif not math.isfinite(bound):
            msg = "no bound yet: the time ran out before the root relaxation; give it more time"
        else:
            msg = f"gap left: bound err {(bound - full) / (-full):.6g} vs incumbent err {(search.UB - full) / (-full):.6g}"
        return Result(keep=search.best_S, status=status, bound=bound, info=info, message=msg)


def _root_data(instance: Instance, F: np.ndarray, D: np.ndarray, dev: torch.device) -> RootData:
    parts, budget = parts_and_budget(instance)
    return RootData(
        H=torch.as_tensor(instance.H, device=dev), F=torch.as_tensor(F, device=dev),
        D=D, D_t=torch.as_tensor(D, device=dev), group_rows=instance.group_rows,
        sizes=instance.group_sizes.astype(np.int64), parts=parts, budget=budget,
    )


class _Search:
    """The best-first node loop, its incumbent and its bookkeeping.

    Runs in the solving process, or in a worker process on a share of the
    open nodes (`_Parallel`); `run` processes nodes until the heap is empty,
    the deadline, max_nodes or a stop condition, and returns the open nodes.
    """

    def __init__(self, instance: Instance, F: np.ndarray, root: RootData, params: BnbParams, UB: float,
                 best_S: np.ndarray, deadline: float | None):
        self.instance, self.F, self.root, self.params = instance, F, root, params
        self.parts, self.budget = root.parts, root.budget
        self.full = instance.full_objective
        self.tol = params.gap_tol * (-self.full)
        self.UB, self.best_S = UB, best_S
        self.deadline = deadline
        self.info: dict = {"nodes": 0, "pruned": 0, "fixed_by_bound": 0, "newton_steps": 0, "osscar_runs": 0,
                           "reoptimized": 0, "refined": 0}
        self.pruned_min = math.inf  # smallest bound among nodes closed by their bound
        self._lam: float | None = None  # lambda_min(H), computed at the first per-node split
        every = params.reoptimize_every
        self.refine_every = int(every) if every is not None else (3 if instance.n_groups >= AUTO_REFINE_GROUPS else 0)
        self.seen: set = set()
        self.trace: Trace | None = None  # progress, kept by the solving process only
        self.timed_out = False
        self.counter = itertools.count(1)
        p = instance.n_groups
        # pseudocosts: bound gain per unit change of z_g, summed and counted, [out, in] x group
        self.pc_sum, self.pc_cnt = np.zeros((2, p)), np.zeros((2, p))

    def try_support(self, S: np.ndarray) -> None:
        key = S.tobytes()
        if key in self.seen:
            return
        self.seen.add(key)
        val = objective_of(self.instance, self.F, S)
        if val < self.UB:
            self.UB, self.best_S = val, np.sort(S)

    @property
    def lam(self) -> float:
        if self._lam is None:
            self._lam = float(scipy.linalg.eigvalsh(self.instance.H, check_finite=False, subset_by_index=[0, 0])[0])
        return self._lam

    def close(self, lb: float) -> None:
        self.pruned_min = min(self.pruned_min, lb)
        self.info["pruned"] += 1

    def run(self, heap: list, until: float | None = None, max_open: int | None = None,
            max_nodes: int | None = None) -> list:
        params = self.params
        max_nodes = params.max_nodes if max_nodes is None else max_nodes
        heapq.heapify(heap)
        while heap:
            now = time.perf_counter()
            if self.deadline is not None and now > self.deadline:
                self.timed_out = True
                break
            if (until is not None and now > until) or (max_open is not None and len(heap) >= max_open):
                break
            if max_nodes is not None and self.info["nodes"] >= max_nodes:
                break
            node = heapq.heappop(heap)
            if node.lb >= self.UB - self.tol:
                self.close(node.lb)
                continue
            self.info["nodes"] += 1
            self.process(node, heap)
            if self.trace is not None:  # every open node is in the heap: its smallest bound holds
                self.trace.add(self.UB, min(self.UB, self.pruned_min, heap[0].lb if heap else math.inf))
        return heap

    def process(self, node: _Node, heap: list) -> None:
        """Bound one node: tighten, round, then close it or push its two children."""
        instance, F, root, params, info = self.instance, self.F, self.root, self.params, self.info
        parts, budget, p = self.parts, self.budget, instance.n_groups
        fixed_in, fixed_out = node.fixed_in.copy(), node.fixed_out.copy()
        lb, z = node.lb, node.z
        D_node = node.D
        depth = node.depth
        split_kw = None  # a per-node diagonal: full near the root, quick refinements deeper down
        if (~fixed_in & ~fixed_out).any() and depth > 0:
            if depth <= params.reoptimize_depth:
                split_kw, counter = {"mu_final": params.reoptimize_mu}, "reoptimized"
            elif self.refine_every and depth % self.refine_every == 0:
                counter = "refined"
                split_kw = {"mu_start": params.refine_mu, "mu_final": params.refine_mu,
                            "max_steps": params.refine_steps, "psd_step": 0.9} \
                    if params.refine_steps > 0 else {"mu_final": params.reoptimize_mu}
        if split_kw is not None:
            D_node, _ = optimal_diagonal(instance.H, F, instance.groups, parts, budget, deadline=self.deadline,
                                         fixed_in=fixed_in, fixed_out=fixed_out, D_start=node.D,
                                         z_start=node.z, lam=self.lam, **split_kw)
            info[counter] += 1
        for _ in range(params.fixing_rounds + 1):
            free = ~fixed_in & ~fixed_out
            if not free.any():  # a leaf: the support is fixed
                S = np.flatnonzero(fixed_in)
                self.try_support(S)
                self.pruned_min = min(self.pruned_min, objective_of(instance, F, S))
                return
            relax = NodeRelaxation(root, fixed_in, free, D_node)
            z_start = None if z is None else z[relax.free_groups]
            prune_at = self.UB - self.tol
            out = relax.solve(z_start, prune_at, params.max_newton, params.min_newton, deadline=self.deadline)
            info["newton_steps"] += out["steps"]
            lb = max(lb, out["lb"])
            if node.branch is not None:
                self.record_gain(node.branch, lb)
                node.branch = None
            z_full = np.zeros(p)
            z_full[fixed_in] = 1.0
            z_full[relax.free_groups] = out["z"]
            z = z_full
            if depth == 0 and "root_bound_err" not in info:
                info["root_bound_err"] = (lb - self.full) / (-self.full)
            if lb >= prune_at:
                self.close(lb)
                return
            # incumbent from rounding z (top z of every part)
            self.try_support(_round(z, parts, budget, fixed_in, fixed_out))
            n = info["nodes"]
            if n & (n - 1) == 0 and n <= params.osscar_nodes and fixed_in.any() | fixed_out.any():
                S = restricted_osscar(instance, fixed_in, fixed_out, self.deadline)
                info["osscar_runs"] += 1
                if S is not None:
                    self.try_support(S)
            prune_at = self.UB - self.tol
            if lb >= prune_at:
                self.pruned_min = min(self.pruned_min, lb)
                return
            n_fixed, child_min = _fix_by_bound(relax, out, prune_at, fixed_in, fixed_out)
            self.pruned_min = min(self.pruned_min, child_min)
            info["fixed_by_bound"] += n_fixed
            if n_fixed == 0:
                break
            if not _propagate(parts, budget, fixed_in, fixed_out):
                return  # no feasible completion: the node holds nothing
        free = np.flatnonzero(~fixed_in & ~fixed_out)
        if free.size == 0:
            heapq.heappush(heap, _Node(lb, depth + 1, next(self.counter), fixed_in, fixed_out, z, D_node))
            return
        frac = np.minimum(z[free], 1.0 - z[free])
        order = None  # free groups by pseudocost score, when branching by pseudocosts
        if params.branching == "fractional" or not (frac > 1e-9).any():
            g = int(free[np.argmax(frac)])
        else:
            order = self.ranked(free, z, frac)
            g = int(order[0])
        child_lbs, child_zs = (lb, lb), (None, None)
        prune_at = self.UB - self.tol
        if depth < params.strong_depth and params.strong_candidates > 1 and free.size > 1:
            cands = free[np.argsort(-frac, kind="stable")[: params.strong_candidates]]
            g, child_lbs, child_zs = self.strong_branch(fixed_in, fixed_out, z, D_node, lb, cands, prune_at)
        elif params.branching == "reliability" and order is not None and free.size > 1:
            cands = order[: params.strong_candidates]
            if (self.pc_cnt[:, cands].min(axis=0) < params.reliability).any():
                g, child_lbs, child_zs = self.strong_branch(fixed_in, fixed_out, z, D_node, lb, cands, prune_at)
        for into, child_lb, child_z in zip((True, False), child_lbs, child_zs):
            fi, fo = fixed_in.copy(), fixed_out.copy()
            (fi if into else fo)[g] = True
            if child_lb >= prune_at:
                self.close(child_lb)
            elif _propagate(parts, budget, fi, fo):
                change = abs((1.0 if into else 0.0) - z[g])
                if child_z is None:  # warm start: the parent's z with g set (else the strong-branching iterate)
                    child_z = z.copy()
                    child_z[g] = 1.0 if into else 0.0
                branch = (g, into, change, lb)
                heapq.heappush(heap, _Node(child_lb, depth + 1, next(self.counter), fi, fo, child_z, D_node, branch))

    def record_gain(self, branch: tuple, lb: float) -> None:
        g, into, change, parent_lb = branch
        if change > 1e-6 and math.isfinite(lb) and math.isfinite(parent_lb):
            self.pc_sum[int(into), g] += max(lb - parent_lb, 0.0) / change
            self.pc_cnt[int(into), g] += 1

    def ranked(self, free: np.ndarray, z: np.ndarray, frac: np.ndarray) -> np.ndarray:
        """Free groups by pseudocost score (product of the estimated gains), best first."""
        cnt = self.pc_cnt[:, free]
        est = np.empty((2, free.size))
        for d in (0, 1):
            known = self.pc_cnt[d] > 0
            mean = float((self.pc_sum[d][known] / self.pc_cnt[d][known]).mean()) if known.any() else 1.0
            est[d] = np.where(cnt[d] > 0, self.pc_sum[d, free] / np.maximum(cnt[d], 1), mean)
        zf = z[free]
        score = np.maximum(est[0] * zf, 1e-12) * np.maximum(est[1] * (1.0 - zf), 1e-12)
        score[frac <= 1e-9] = -1.0
        return free[np.argsort(-score, kind="stable")]

    def strong_branch(self, fixed_in, fixed_out, z, D_node, lb, candidates, prune_at) -> tuple[int, tuple, tuple]:
        """Branch on the candidate whose two children have the best bounds (product rule).

        Each child's relaxation gets `strong_steps` projected Newton steps from the
        parent's z; its bound is valid for that child and becomes its priority,
        and its last iterate the child's warm start. Returns the group, the two
        children's bounds and their z (None where there is none).
        """
        params, info = self.params, self.info
        best = (-math.inf, int(candidates[0]), (lb, lb), (None, None))
        for g in candidates:
            lbs, zs = [], []
            for into in (True, False):
                fi, fo = fixed_in.copy(), fixed_out.copy()
                (fi if into else fo)[g] = True
                zs.append(None)
                if not _propagate(self.parts, self.budget, fi, fo):
                    lbs.append(math.inf)
                    continue
                fr = ~fi & ~fo
                if not fr.any():
                    lbs.append(objective_of(self.instance, self.F, np.flatnonzero(fi)))
                    continue
                rel = NodeRelaxation(self.root, fi, fr, D_node)
                zc = z.copy()
                zc[g] = 1.0 if into else 0.0
                out = rel.solve(zc[rel.free_groups], prune_at, params.strong_steps, params.strong_steps,
                                deadline=self.deadline)
                info["strong_solves"] = info.get("strong_solves", 0) + 1
                lbs.append(max(lb, out["lb"]))
                self.record_gain((int(g), into, abs(zc[g] - z[g]), lb), lbs[-1])
                zc[fi], zc[fo] = 1.0, 0.0
                zc[rel.free_groups] = out["z"]
                zs[-1] = zc
            gain_in, gain_out = lbs[0] - lb, lbs[1] - lb
            score = max(gain_in, 1e-12) * max(gain_out, 1e-12) if math.isfinite(gain_in) and math.isfinite(gain_out) else math.inf
            if lbs[0] >= prune_at and lbs[1] >= prune_at:
                return int(g), (lbs[0], lbs[1]), (zs[0], zs[1])  # both children closed: the node is done
            if score > best[0]:
                best = (score, int(g), (lbs[0], lbs[1]), (zs[0], zs[1]))
        return best[1], best[2], best[3]


# ------------------------------------------------------------ worker processes
def _pack(nodes: list) -> dict:
    """Open nodes as a few arrays (fast to pickle); nodes sharing a diagonal share one copy."""
    Ds, where = [], {}
    d_index = np.empty(len(nodes), np.int64)
    for i, n in enumerate(nodes):
        key = id(n.D)
        if key not in where:
            where[key] = len(Ds)
            Ds.append(n.D)
        d_index[i] = where[key]
    return {
        "lb": np.array([n.lb for n in nodes]), "depth": np.array([n.depth for n in nodes], np.int64),
        "fi": np.packbits(np.array([n.fixed_in for n in nodes]), axis=1),
        "fo": np.packbits(np.array([n.fixed_out for n in nodes]), axis=1),
        "z": np.array([n.z for n in nodes]), "D": Ds, "d_index": d_index, "p": nodes[0].fixed_in.size,
    }


def _unpack(packed: dict) -> list:
    p = packed["p"]
    fi = np.unpackbits(packed["fi"], axis=1, count=p).astype(bool)
    fo = np.unpackbits(packed["fo"], axis=1, count=p).astype(bool)
    return [_Node(float(packed["lb"][i]), int(packed["depth"][i]), i, fi[i], fo[i], packed["z"][i],
                  packed["D"][int(packed["d_index"][i])]) for i in range(packed["lb"].size)]


_WORKER: dict = {}


def _worker_init(instance: Instance, F: np.ndarray, D: np.ndarray, params: BnbParams) -> None:
    cpu_threads(1).__enter__()  # for the life of the worker: one thread each, as in the serial search
    _WORKER.update(instance=instance, F=F, params=params,
                   root=_root_data(instance, F, D, torch.device("cpu")))


def _worker_solve(packed: dict, UB: float, best_S: np.ndarray, seconds_left: float | None, slice_s: float,
                  max_nodes: int | None, pseudocosts: tuple) -> dict:
    """Search a share of the open nodes for up to slice_s seconds; return what is left.

    The search starts from the solving process's pseudocosts and sends back what it added.
    """
    now = time.perf_counter()
    deadline = None if seconds_left is None else now + seconds_left
    w = _WORKER
    search = _Search(w["instance"], w["F"], w["root"], w["params"], UB, best_S, deadline)
    search.pc_sum, search.pc_cnt = pseudocosts[0].copy(), pseudocosts[1].copy()
    heap = search.run(_unpack(packed), until=now + slice_s, max_nodes=max_nodes)
    added = (search.pc_sum - pseudocosts[0], search.pc_cnt - pseudocosts[1])
    return {"open": _pack(heap) if heap else None, "UB": search.UB, "best_S": search.best_S,
            "pruned_min": search.pruned_min, "info": search.info, "timed_out": search.timed_out,
            "pseudocosts": added}


class _Parallel:
    """Best-first search shared by `workers` processes.

    The solving process searches alone until the workers have started (easy
    instances finish before that), then deals the open nodes out in shares.
    A worker searches its share best-first for `slice_seconds` and sends back
    what is still open, which is split and dealt out again, so no worker idles
    while another holds a large subtree. Every share carries the incumbent
    value; bounds, pruned minima and counters are merged here, so the bound
    stays valid at any moment (the open nodes are always either in a share or
    in a worker that will return them).
    """

    def __init__(self, search: _Search, params: BnbParams, D: np.ndarray):
        self.search, self.params, self.D = search, params, D

    def run(self, heap: list, search_while_starting: bool = True) -> list:
        """Search `heap` with the workers; returns the nodes left open (deadline or max_nodes)."""
        s, params = self.search, self.params
        W = int(params.workers)
        with worker_pool(W, _worker_init, (s.instance, s.F, self.D, params), "bnb") as (pool, ready):
            while search_while_starting and heap and not all(f.done() for f in ready):  # search here meanwhile
                heap = s.run(heap, until=time.perf_counter() + 0.05)
                if s.timed_out or (params.max_nodes is not None and s.info["nodes"] >= params.max_nodes):
                    return heap
            if not heap:
                return heap
            for f in ready:
                f.result()  # a worker that failed to start raises here
            return self._share(pool, heap, W)

    def _share(self, pool, heap: list, W: int) -> list:
        import concurrent.futures as cf

        s, params = self.search, self.params
        s.info["workers"] = W
        shares: list[list] = self._split(heap, 2 * W)
        running: dict = {}
        left: list = []
        while shares or running:
            now = time.perf_counter()
            late = s.deadline is not None and now > s.deadline
            capped = params.max_nodes is not None and s.info["nodes"] >= params.max_nodes
            while shares and len(running) < W and not late and not capped:
                share = []
                for n in shares.pop(0):
                    if n.lb < s.UB - s.tol:
                        share.append(n)
                    else:
                        s.close(n.lb)
                if not share:
                    continue
                seconds_left = None if s.deadline is None else max(s.deadline - now, 0.0)
                cap = None if params.max_nodes is None else params.max_nodes - s.info["nodes"]
                fut = pool.submit(_worker_solve, _pack(share), s.UB, s.best_S, seconds_left,
                                  params.slice_seconds, cap, (s.pc_sum, s.pc_cnt))
                running[fut] = share
            if not running:
                if late:
                    s.timed_out = True
                left.extend(n for sh in shares for n in sh)
                break
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                running.pop(fut)
                r = fut.result()
                if r["UB"] < s.UB:
                    s.UB, s.best_S = r["UB"], np.sort(r["best_S"])
                s.pruned_min = min(s.pruned_min, r["pruned_min"])
                s.timed_out |= r["timed_out"]
                s.pc_sum += r["pseudocosts"][0]
                s.pc_cnt += r["pseudocosts"][1]
                for k, v in r["info"].items():
                    if isinstance(v, (int, float)) and k in ("nodes", "pruned", "fixed_by_bound", "newton_steps",
                                                            "osscar_runs", "reoptimized", "refined", "strong_solves"):
                        s.info[k] = s.info.get(k, 0) + v
                s.info["shares"] = s.info.get("shares", 0) + 1
                if r["open"] is not None:
                    rest = _unpack(r["open"])
                    shares.extend(self._split(rest, 2 if len(shares) < W else 1))
            shares.sort(key=lambda sh: min(n.lb for n in sh))
            if s.trace is not None:  # open nodes: in a share here, or below a share a worker holds
                open_min = min((min(n.lb for n in sh) for sh in [*shares, *running.values()] if sh), default=math.inf)
                s.trace.add(s.UB, min(s.UB, s.pruned_min, open_min))
        return left

    @staticmethod
    def _split(nodes: list, pieces: int) -> list[list]:
        """Deal nodes, in bound order, round-robin into `pieces` shares of similar difficulty."""
        nodes = sorted(nodes)
        pieces = max(1, min(pieces, len(nodes)))
        return [nodes[i::pieces] for i in range(pieces)]


def _trivial(instance: Instance) -> bool:
    """True when every part's budget is 0 or its size (one feasible support)."""
    parts, budget = parts_and_budget(instance)
    sizes = np.bincount(parts, minlength=budget.size)
    return bool(np.all((budget == 0) | (budget == sizes)))


def _round(z: np.ndarray, parts: np.ndarray, budget: np.ndarray, fixed_in: np.ndarray, fixed_out: np.ndarray) -> np.ndarray:
    """The feasible support taking the largest z of every part (fixings respected)."""
    score = np.where(fixed_in, 2.0, np.where(fixed_out, -1.0, z))
    chosen = []
    for j in range(budget.size):
        mem = np.flatnonzero(parts == j)
        chosen.append(mem[np.argsort(-score[mem], kind="stable")[: int(budget[j])]])
    return np.sort(np.concatenate(chosen))


def _fix_by_bound(relax: NodeRelaxation, out: dict, prune_at: float, fixed_in: np.ndarray,
                  fixed_out: np.ndarray) -> tuple[int, float]:
    """Fix free groups whose opposite child is provably no better than the incumbent.

    With the node's best W: LB = base - 0.5 sum_j top_{k_j}(q in part j). The
    child "g in" (g not selected) has LB_in = LB - 0.5 (q_g - q_[k_j]) and the
    child "g out" (g selected) LB_out = LB - 0.5 (q_[k_j + 1] - q_g); both are
    Fenchel bounds of the same W, so valid. Modifies the masks; returns the
    count and the smallest bound of the children so discarded.
    """
    if out.get("q") is None:
        return 0, math.inf
    q = out["q"]
    lb = out["lb"]
    count, child_min = 0, math.inf
    for mem, k in zip(relax.members, relax.need):
        if k <= 0 or k >= mem.size:
            continue
        order = mem[np.argsort(-q[mem], kind="stable")]
        q_last_in, q_first_out = q[order[k - 1]], q[order[k]]
        # selected groups: forcing one out swaps in q_[k+1]; the others: forcing one in swaps out q_[k]
        child = np.empty(order.size)
        child[:k] = lb - 0.5 * (q_first_out - q[order[:k]])
        child[k:] = lb - 0.5 * (q[order[k:]] - q_last_in)
        hit = child >= prune_at
        if not hit.any():
            continue
        groups = relax.free_groups[order]
        fixed_in[groups[:k][hit[:k]]] = True
        fixed_out[groups[k:][hit[k:]]] = True
        count += int(hit.sum())
        child_min = min(child_min, float(child[hit].min()))
    return count, child_min
