"""osscar-opt: one-shot structured pruning posed as mixed-integer optimization.

    >>> import osscar_opt as oo
    >>> inst = oo.load_instance("instances/t0/....npz")
    >>> sol = oo.solve(inst, "osscar")
    >>> sol.keep, sol.err, sol.status
"""

from .errors import (
    InstanceError,
    InstanceFileError,
    MissingPackageError,
    OsscarError,
    SolverError,
)
from .evaluate import Evaluation, evaluate
from .instance import Instance, Partition
from .io import load_instance, save_instance
from .registry import Result, Solution, Solver, SolverInfo, Status, register, solve, solvers

__version__ = "0.1.0"

__all__ = [
    "Evaluation",
    "Instance",
    "InstanceError",
    "InstanceFileError",
    "MissingPackageError",
    "OsscarError",
    "Partition",
    "Result",
    "Solution",
    "Solver",
    "SolverError",
    "SolverInfo",
    "Status",
    "evaluate",
    "load_instance",
    "register",
    "save_instance",
    "solve",
    "solvers",
]
