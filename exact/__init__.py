"""Exact MIQP solvers and relaxation bounds; each module registers its solvers.

Registration order is the preference order of `osscar_opt.solvers()`.
"""

from . import enumerate as _enumerate  # noqa: F401  enumerate
from . import bnb as _bnb  # noqa: F401  bnb
from . import shor as _shor  # noqa: F401  shor-bnb
from . import relax as _relax  # noqa: F401  relax
from . import highs_oa as _highs_oa  # noqa: F401  highs-oa
from . import scip as _scip  # noqa: F401  scip
from . import pyomo_model as _pyomo_model  # noqa: F401  pyomo
