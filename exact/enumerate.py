"""Brute-force enumeration: the ground truth for small instances.

Minimizes f(S) = -0.5 tr(G_S' H_SS^-1 G_S) over every feasible support S of
`keep` groups. f depends on G only through M = G G', so the m output columns
are first compressed to a factor F with F F' = M of at most min(d, m) columns;
then every support costs one small batched Cholesky solve.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from osscar_opt.instance import Instance
from osscar_opt.linalg import batched_objectives, output_factor
from osscar_opt.registry import Result, Solver, Status, register


@dataclass
class EnumerateParams:
    """max_supports: refuse instances with more feasible supports than this.
    batch: supports evaluated per batched Cholesky."""

    max_supports: int = 5_000_000
    batch: int = 32768


def n_supports(instance: Instance) -> int:
    part = instance.partition
    if part is None:
        return math.comb(instance.n_groups, instance.keep)
    sizes = part.part_sizes()
    return int(np.prod([math.comb(int(s), int(b)) for s, b in zip(sizes, part.budget)]))


def supports(instance: Instance):
    """Iterate over every feasible support (tuples of group ids)."""
    part = instance.partition
    if part is None:
        yield from itertools.combinations(range(instance.n_groups), instance.keep)
        return
    members = [np.flatnonzero(part.parts == j).tolist() for j in range(part.n_parts)]
    choices = [itertools.combinations(mem, int(b)) for mem, b in zip(members, part.budget)]
    for combo in itertools.product(*[list(c) for c in choices]):
        yield tuple(sorted(itertools.chain.from_iterable(combo)))


@register
class Enumerate(Solver):
    name = "enumerate"
    exact = True
    devices = ("cpu", "cuda")
    Params = EnumerateParams
    description = "vectorized brute force over every support (batched Cholesky), exact for small p"

    def skip(self, instance, params):
        count = n_supports(instance)
        if count > params.max_supports:
            return True, f"{count:,} supports exceed max_supports={params.max_supports:,}"
        return False, ""

    def prepare(self, instance, params, device):
        dev = torch.device(device)
        H = torch.as_tensor(instance.H, device=dev)
        F = output_factor(H @ torch.as_tensor(instance.W, device=dev))
        return instance, H, F

    def run(self, state, params, deadline):
        instance, H, F = state
        if instance.keep == 0:
            return Result(keep=[], status=Status.OPTIMAL, bound=0.0)
        b = instance.group_size
        best_val, best_S = math.inf, None
        it = supports(instance)
        while True:
            chunk = list(itertools.islice(it, params.batch))
            if not chunk:
                break
            if deadline is not None and time.perf_counter() > deadline:
                return Result(keep=best_S, status=Status.TIME_LIMIT, message="enumeration stopped by the time limit")
            combos = np.array(chunk, dtype=np.int64)
            if b is not None:
                idx = (combos[:, :, None] * b + np.arange(b)).reshape(len(chunk), -1)
                vals = batched_objectives(H, F, torch.as_tensor(idx, device=H.device))
            else:  # uneven groups: batch the supports that have the same row count
                idx_list = [instance.rows_of(S) for S in chunk]
                vals = torch.empty(len(chunk), dtype=H.dtype, device=H.device)
                lengths = np.array([len(r) for r in idx_list])
                for n_rows in np.unique(lengths):
                    sel = np.flatnonzero(lengths == n_rows)
                    idx = torch.as_tensor(np.stack([idx_list[i] for i in sel]), device=H.device)
                    vals[torch.as_tensor(sel, device=H.device)] = batched_objectives(H, F, idx)
            j = int(torch.argmin(vals))
            if float(vals[j]) < best_val:
                best_val, best_S = float(vals[j]), chunk[j]
        # The minimum over every support is optimal: its value is the bound.
        return Result(keep=list(best_S), status=Status.OPTIMAL, bound=best_val)
