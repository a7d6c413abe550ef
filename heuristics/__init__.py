"""Baseline pruning heuristics; each module registers its solvers.

Registration order is the preference order of `osscar_opt.solvers()`.
"""

from . import scores as _scores  # noqa: F401  magnitude, magnitude-refit, activation
from . import elimination as _elimination  # noqa: F401  obs-greedy, forward
from . import iht as _iht  # noqa: F401  iht
from . import random_support as _random_support  # noqa: F401  random
