"""Random baseline: a uniformly random support, seeded.

Every group gets an independent uniform score from numpy's default_rng(seed)
and the `keep` largest are kept (with a partition: the budget[j] largest of
every part j), which is a uniformly random support (within every part).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from osscar_opt.registry import register

from .scores import _ScoreSolver


@dataclass
class RandomParams:
    """seed: seed of numpy's default_rng; the same seed gives the same support."""

    seed: int = 0

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")


@register
class RandomSupport(_ScoreSolver):
    """A uniformly random support (uniform within every part under a partition)."""

    name = "random"
    Params = RandomParams
    description = "uniformly random support (seeded), optimal weights on it"

    def scores(self, instance, params):
        return np.random.default_rng(int(params.seed)).random(instance.n_groups)
