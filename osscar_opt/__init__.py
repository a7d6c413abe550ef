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

# the model driver, after the registry it uses (each name binds the function over its submodule)
from .apply import PruneReport, apply  # noqa: E402
from .evaluation import evaluate_model  # noqa: E402
from .surgery import load_pruned, save_pruned  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Evaluation",
    "Instance",
    "InstanceError",
    "InstanceFileError",
    "MissingPackageError",
    "OsscarError",
    "Partition",
    "PruneReport",
    "Result",
    "Solution",
    "Solver",
    "SolverError",
    "SolverInfo",
    "Status",
    "apply",
    "evaluate",
    "evaluate_model",
    "load_instance",
    "load_pruned",
    "register",
    "save_instance",
    "save_pruned",
    "solve",
    "solvers",
]
