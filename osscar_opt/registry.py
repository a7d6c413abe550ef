"""One solver protocol and one registry keyed by name (DESIGN.md section 2).

A solver is a subclass of `Solver` registered with `@register`. It declares

    name      the registry key (e.g. "osscar", "magnitude", "scip")
    exact     whether it can prove optimality
    requires  optional packages it imports inside `prepare`/`run`
    devices   device types it runs on ("cpu", "cuda")
    Params    a dataclass of its parameters (the CLI's -p NAME=VALUE mirror it)

and implements `skip` (what it cannot do, with a reason), `prepare` (untimed:
moving data to a device, permutations) and `run` (timed). `solve` wraps them,
re-evaluates the returned support with the fp64 evaluator and returns a
`Solution`. Registration order is the preference order of `solvers()`.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.util
import os
import time
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .errors import InstanceError, SolverError
from .evaluate import evaluate, evaluate_masked, masked_weights, support_array
from .instance import Instance
from .linalg import cpu_threads, spare_thread_cap


class Status(str, enum.Enum):
    """Closed vocabulary of solution statuses."""

    OPTIMAL = "OPTIMAL"  # proven optimal (bound equals objective within tolerance)
    FEASIBLE = "FEASIBLE"  # a feasible support, no proof
    TIME_LIMIT = "TIME_LIMIT"  # stopped by the time limit; support feasible when present
    ERROR = "ERROR"  # the solver failed; see Solution.message

    def __str__(self) -> str:
        return self.value


@dataclass
class Result:
    """What a solver's `run` returns; `solve` turns it into a Solution."""

    keep: Any  # group ids of the support (None on failure)
    status: Status = Status.FEASIBLE
    bound: float | None = None  # proven lower bound on f (objective scale)
    info: dict = field(default_factory=dict)
    message: str = ""


@dataclass
class Solution:
    """A solved instance. Every number is from the fp64 evaluator."""

    solver: str
    status: Status
    keep: np.ndarray  # sorted group ids kept
    objective: float  # f(S)
    err: float  # relative reconstruction error of the support
    weights: np.ndarray | None  # (d, m) optimal weights on the support
    bound: float | None  # proven lower bound on f, None unless proven
    seconds: float  # timed solve only (prepare excluded)
    params: dict  # the parameters used
    device: str = "cpu"
    prepare_seconds: float = 0.0
    info: dict = field(default_factory=dict)
    message: str = ""

    @property
    def deployed_err(self) -> float:
        """err of the weights this solution deploys (the refit, or W_hat unrefit)."""
        return float(self.info.get("err_no_refit", self.err))

    @property
    def err_bound(self) -> float | None:
        """Lower bound on err implied by `bound` (clipped at 0)."""
        if self.bound is None or self._full_objective is None:
            return None
        return max(0.0, err_of_objective_value(self._full_objective, self.bound))

    @property
    def gap(self) -> float | None:
        """Certified relative gap (err - err_bound) / err, or None without a bound."""
        lb = self.err_bound
        if lb is None or not np.isfinite(self.err):
            return None
        if self.err <= 0:
            return 0.0
        return max(0.0, (self.err - lb) / self.err)

    _full_objective: float | None = field(default=None, repr=False)

    def to_dict(self, weights: bool = False) -> dict:
        out = {
            "solver": self.solver,
            "status": str(self.status),
            "keep": [int(g) for g in self.keep],
            "objective": self.objective,
            "err": self.err,
            "bound": self.bound,
            "err_bound": self.err_bound,
            "gap": self.gap,
            "seconds": self.seconds,
            "prepare_seconds": self.prepare_seconds,
            "device": self.device,
            "params": self.params,
            "info": self.info,
            "message": self.message,
        }
        if weights and self.weights is not None:
            out["weights"] = self.weights.tolist()
        return out


def err_of_objective_value(full_objective: float, objective: float) -> float:
    return (objective - full_objective) / (-full_objective)


@dataclass
class NoParams:
    """This solver has no parameters."""


class Solver:
    """Base class of every solver. Subclass, set the class attributes, register."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str] = "exact"  # pip extra that installs `requires`
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    refits: ClassVar[bool] = True  # False: the method deploys W_hat on its support, unrefit
    Params: ClassVar[type] = NoParams
    description: ClassVar[str] = ""

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(True, "") when every required package is importable here."""
        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        if missing:
            return False, f"needs {', '.join(missing)}: pip install 'osscar-opt[{cls.extra}]'"
        return True, ""

    def skip(self, instance: Instance, params: Any) -> tuple[bool, str]:
        """(True, reason) when this solver cannot handle the instance."""
        return False, ""

    def prepare(self, instance: Instance, params: Any, device: str) -> Any:
        """Untimed set-up. Returns the state handed to `run`."""
        return instance

    def run(self, state: Any, params: Any, deadline: float | None) -> Result:
        """Timed solve. `deadline` is a time.perf_counter() value or None."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Solver]] = {}
_BUILTIN_LOADED = False


def register(cls: type[Solver]) -> type[Solver]:
    """Class decorator adding a solver to the registry under `cls.name`."""
    if not cls.name:
        raise SolverError(f"{cls.__name__} has no name: set the class attribute `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        existing = _REGISTRY[cls.name]
        if (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise SolverError(f"a solver named {cls.name!r} is already registered ({existing.__qualname__})")
    if not dataclasses.is_dataclass(cls.Params):
        raise SolverError(f"{cls.__name__}.Params must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    """Import the packages whose solvers register themselves, once."""
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    for module in ("osscar_opt.osscar", "heuristics", "exact"):
        importlib.import_module(module)
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="osscar_opt.solvers"):
            ep.load()
    except Exception as exc:  # a broken third-party plugin must not break the core
        import warnings

        warnings.warn(f"a solver plugin failed to load: {exc}", stacklevel=2)


def get_solver(name: str) -> type[Solver]:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SolverError(f"unknown solver {name!r}: choose one of {', '.join(_REGISTRY)}") from None


def available_solver(name: str) -> type[Solver]:
    """The registered solver `name`; SolverError when it is unknown or cannot run here."""
    cls = get_solver(name)
    ok, why = cls.available()
    if not ok:
        raise SolverError(f"solver {name!r} is not available here: {why}")
    return cls


@dataclass(frozen=True)
class SolverInfo:
    name: str
    exact: bool
    available: bool
    reason: str
    devices: tuple[str, ...]
    description: str
    params: tuple[str, ...]


def solvers() -> list[SolverInfo]:
    """Every registered solver, in preference order, with its availability here."""
    _load_builtin()
    out = []
    # core first, then heuristics, exact solvers and plugins, whatever the import order was
    rank = {"osscar_opt": 0, "heuristics": 1, "exact": 2}
    ordered = sorted(_REGISTRY.items(), key=lambda kv: rank.get(kv[1].__module__.split(".")[0], 3))
    for name, cls in ordered:
        ok, reason = cls.available()
        fields = tuple(f.name for f in dataclasses.fields(cls.Params))
        out.append(SolverInfo(name, cls.exact, ok, reason, cls.devices, cls.description, fields))
    return out


def make_params(cls: type[Solver], params: dict) -> Any:
    """Build the solver's Params dataclass, with a clear error for unknown names."""
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        if unknown[0] in ("keep", "sparsity"):
            raise SolverError(f"{unknown[0]} is not a solver parameter: set it on the instance, "
                              "instance.with_keep(k) or instance.with_keep(instance.keep_for_sparsity(s))")
        valid = ", ".join(fields) or "none"
        raise SolverError(f"solver {cls.name!r} has no parameter {unknown[0]!r}: valid parameters are {valid}")
    try:
        return cls.Params(**params)
    except (TypeError, ValueError) as exc:
        raise SolverError(f"bad parameters for solver {cls.name!r}: {exc}") from None


def coerce_param(cls: type[Solver], name: str, text: str) -> Any:
    """Convert a command-line string to the type of the Params field `name`."""
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    if name not in fields:
        valid = ", ".join(fields) or "none"
        raise SolverError(f"solver {cls.name!r} has no parameter {name!r}: valid parameters are {valid}")
    hints = typing.get_type_hints(cls.Params)
    kind = hints.get(name, str)
    options = typing.get_args(kind) or (kind,)
    if text.lower() in ("none", "null") and type(None) in options:
        return None
    for option in options:
        if option is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            continue
        if option in (int, float, str):
            try:
                return option(text)
            except ValueError:
                continue
    raise SolverError(f"parameter {name!r} of solver {cls.name!r} expects {kind}, got {text!r}")


def device_problem(device: Any, use_cpu: str = "device='cpu'") -> str | None:
    """What is wrong with a device name here (None if nothing): not cpu / cuda / cuda:N,
    no CUDA in this torch or machine, or a CUDA index the machine lacks. `use_cpu`
    spells the fix in the caller's terms (a keyword or a command-line flag)."""
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        return "use cpu, cuda or cuda:N"
    if kind == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return f"torch.cuda.is_available() is False here (a CPU build of torch, or no GPU visible): use {use_cpu}"
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        return f"this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
    return None


def resolve_device(device: Any, supported: tuple[str, ...], default_gpu: bool = False, what: str = "this solver") -> str:
    """Turn None / "cpu" / "cuda" / "cuda:1" / torch.device into a checked string."""
    if device is None:
        if default_gpu and "cuda" in supported:
            import torch

            if torch.cuda.is_available():
                return "cuda"
        return "cpu"
    text = str(device)
    kind = text.split(":")[0]
    if kind not in supported:
        raise SolverError(f"device {text!r} is not supported by {what}: use one of {', '.join(supported)}")
    problem = device_problem(text)
    if problem:
        raise SolverError(f"device {text!r}: {problem}")
    return text


def solve(
    instance: Instance | str | os.PathLike,
    solver: str = "osscar",
    device: Any = None,
    time_limit: float | None = None,
    **params: Any,
) -> Solution:
    """Solve `instance` (an Instance or an instance file) with the named solver and return an
    evaluated Solution.

    The time limit covers `run` only; `prepare` is untimed and reported apart.
    Raises SolverError for an unknown solver, bad parameters, a missing package
    or an instance the solver skips; a failure inside the solver returns a
    Solution with status ERROR and the message.
    """
    if isinstance(instance, (str, os.PathLike)):
        from .io import load_instance

        instance = load_instance(instance)
    if not isinstance(instance, Instance):
        raise InstanceError(f"solve expects an Instance or the path of an instance file, got {type(instance).__name__}: "
                            "build one with oo.Instance(H, W, keep) or oo.Instance.from_activations(X, W, keep)")
    cls = available_solver(solver)
    if time_limit is not None and not (isinstance(time_limit, (int, float)) and time_limit > 0):
        raise SolverError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    p = make_params(cls, params)
    dev = resolve_device(device, cls.devices, default_gpu=True)
    impl = cls()
    skip, why = impl.skip(instance, p)
    if skip:
        raise SolverError(f"solver {solver!r} skips this instance: {why}")
    with cpu_threads(solve_threads(instance, dev, p)):
        t0 = time.perf_counter()
        state = impl.prepare(instance, p, dev)
        t1 = time.perf_counter()
        deadline = None if time_limit is None else t1 + float(time_limit)
        try:
            result = impl.run(state, p, deadline)
        except (SolverError, np.linalg.LinAlgError, RuntimeError) as exc:
            result = Result(keep=None, status=Status.ERROR, message=f"{type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - t1
        del state  # the solver's device buffers are free before the evaluation
    return finish(instance, cls.name, result, seconds, dataclasses.asdict(p), dev, t1 - t0, refits=cls.refits)


# CPU solves of instances with at most this many rows run on one thread (see solve_threads)
SINGLE_THREAD_ROWS = 256


def solve_threads(instance: Instance, device: Any, params: Any) -> int | None:
    """The CPU thread cap of a solve, None for the process setting (and off the CPU, or when
    the solver has a `threads` parameter of its own).

    Instances of at most SINGLE_THREAD_ROWS rows run on one thread: their
    factorizations are too small to gain from threads. Larger ones use the
    cores other processes leave free (`linalg.spare_thread_cap`): with the
    cores busy elsewhere, OpenMP threads spin as they wait and a solve becomes
    many times slower.
    """
    if str(device) != "cpu" or hasattr(params, "threads"):
        return None
    if instance.d <= SINGLE_THREAD_ROWS:
        return 1
    return spare_thread_cap()


def finish(
    instance: Instance,
    solver: str,
    result: Result,
    seconds: float,
    params: dict,
    device: str,
    prepare_seconds: float = 0.0,
    refits: bool = True,
) -> Solution:
    """Re-evaluate a solver's support with the fp64 evaluator and check its claims.

    `objective`, `err` and `bound` always describe the support (its optimal
    refit). For a method that does not refit (`refits=False`), `weights` is
    W_hat with the pruned rows zeroed and info["err_no_refit"] its err.
    """
    full = instance.full_objective
    if result.keep is None:
        status = Status.ERROR if result.status != Status.TIME_LIMIT else Status.TIME_LIMIT
        return Solution(
            solver, status, np.zeros(0, dtype=np.int64), float("nan"), float("nan"), None,
            _valid_bound(result.bound), seconds, params, device, prepare_seconds, result.info,
            result.message or "no solution", _full_objective=full,
        )
    S = support_array(instance, result.keep)
    # the fp64 evaluation runs where the solver ran when that is a GPU
    ev = evaluate(instance, S, device=device if str(device).startswith("cuda") else None)
    status, message = result.status, result.message
    if not ev.feasible:
        status = Status.ERROR
        message = (message + "; " if message else "") + (
            f"solver returned an infeasible support ({S.size} groups for keep={instance.keep}"
            + (", partition budgets violated)" if instance.partition is not None and S.size == instance.keep else ")")
        )
    bound = _valid_bound(result.bound)
    if bound is not None and bound > ev.objective + 1e-9 * abs(full):
        status = Status.ERROR
        message = (message + "; " if message else "") + (
            f"claimed bound {bound:.12g} exceeds the evaluated objective {ev.objective:.12g}; bound dropped"
        )
        bound = None
    if status == Status.OPTIMAL and bound is None:
        bound = ev.objective
    weights = ev.weights
    if not refits:
        weights = masked_weights(instance, S)
        result.info["objective_no_refit"], result.info["err_no_refit"] = evaluate_masked(instance, S)
    return Solution(
        solver, status, S, ev.objective, ev.err, weights, bound, seconds, params, device,
        prepare_seconds, result.info, message, _full_objective=full,
    )


def _valid_bound(bound: float | None) -> float | None:
    if bound is None:
        return None
    bound = float(bound)
    return bound if np.isfinite(bound) else None
