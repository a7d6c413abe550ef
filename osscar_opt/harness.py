"""The comparison harness: every (instance, solver) pair in its own process.

    osscar-opt bench --instances T0,T1 --solvers osscar,enumerate --time-limit 60 --jobs 2 --out results/t01/

Each pair runs in a fresh worker process (`worker_main`, started with the
same Python), so a crash, a segfault in native code or a memory blow-up in
one solver cannot take down the run; workers die with the bench (Linux
parent-death signal), so a killed bench leaves no orphans. The time limit is passed to
`solve(..., time_limit=T)` and enforced from the outside as well: the worker
is killed at T + grace seconds after it starts solving (and, with
--memory-limit, as soon as its resident memory exceeds the limit).

One JSON object per run is appended to `runs.jsonl` in the output folder,
flushed and fsynced as each run finishes, so an interrupted bench loses
nothing already finished. A half-written last line (a killed process) is
ignored and cut off on the next run, and a rerun with the same --out skips
the pairs already recorded (resume). `bench.json` in the same folder holds the
settings every row shares (time limit, device, grace); a rerun must use the
same ones.

Row fields (schema 1): instance, tier, p, d, m, keep, group_size, source,
solver, label (solver plus non-default parameters; the resume key is
(instance, label)), params, status (OPTIMAL, FEASIBLE, TIME_LIMIT, ERROR or
SKIPPED), objective, err, bound, err_bound, gap (all from the fp64 evaluator
in `solve`), support (the kept group ids), seconds (the timed solve),
prepare_seconds, wall_seconds (the worker process, start to exit),
peak_rss_mb, rss_before_solve_mb, cuda_peak_mb, device, threads, time_limit,
message, reason (why SKIPPED), best_known (the catalog's best at run time),
info (the solver's own info, long lists elided except `trace`), machine,
versions, osscar_opt, started_at, host.

Solvers that record their progress put `info["trace"] = [[seconds,
err_upper, err_lower], ...]` (`exact._common.Trace`: bnb, highs-oa, scip and
relax do); `osscar-opt report` draws it as a gap-versus-time curve.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import OsscarError
from .io import writable_folder

SCHEMA = 1
RUNS = "runs.jsonl"
SETTINGS = "bench.json"
VERSIONED = ("numpy", "scipy", "torch", "pyscipopt", "highspy", "cvxpy", "pyomo")
POLL_S = 0.02
STARTUP_TIMEOUT_S = 300.0  # importing torch and loading a T3 instance, before the clock starts
ERR_TOL = 1e-8  # |recorded err - re-evaluated err| accepted when updating the catalog


class BenchError(OsscarError, ValueError):
    """A bench was asked for something it cannot do (selection, solvers, --out)."""


# ---------------------------------------------------------------- tasks
@dataclass
class Task:
    """One (instance, solver) run, JSON-serializable so it can travel to a worker."""

    instance: str  # instance id
    tier: str
    p: int
    d: int
    m: int
    keep: int
    group_size: int | None
    source: dict  # {"file": abs path} or {"catalog": abs path, "entry": {...}, "build_dir": ...}
    solver: str
    label: str
    params: dict
    device: str
    time_limit: float
    grace: float
    memory_limit_mb: float | None = None
    threads: int | None = None
    best_known: dict | None = None
    osscar_opt: str = ""

    def key(self) -> tuple[str, str]:
        return (self.instance, self.label)


@dataclass
class Selected:
    """An instance chosen for the bench, with what a row needs to know about it."""

    id: str
    tier: str
    p: int
    d: int
    m: int
    keep: int
    group_size: int | None
    source: dict
    best_known: dict | None = None
    catalog_id: str | None = None  # set when it came from the catalog


def label_of(solver: str, params: dict) -> str:
    """`osscar` or `osscar[swap_size=2,local_search=False]` (parameters given on the command line)."""
    if not params:
        return solver
    return solver + "[" + ",".join(f"{k}={params[k]}" for k in sorted(params)) + "]"


# ------------------------------------------------------------- selection
def _looks_like_path(item: str) -> bool:
    return ".npz" in item or os.sep in item or Path(item).exists()


def select_instances(items: Sequence[str], catalog_path: str | os.PathLike | None = None,
                     build_dir: str | os.PathLike | None = None) -> list[Selected]:
    """Resolve --instances: catalog tiers/ids/patterns and instance files, globs or folders."""
    from . import library
    from .io import read_header

    tokens = [t.strip() for item in items for t in str(item).split(",") if t.strip()]
    if not tokens:
        raise BenchError("--instances is empty: give tiers (T0,T1), catalog ids or patterns, or instance files")
    files, catalog_items = [], []
    for tok in tokens:
        (files if _looks_like_path(tok) else catalog_items).append(tok)
    out: list[Selected] = []
    if catalog_items:
        catalog = library.Catalog.load(catalog_path)
        entries = catalog.select(catalog_items)
        cat_abs = str(catalog.path.resolve())
        bdir = str(Path(build_dir).resolve()) if build_dir else None
        for e in entries:
            out.append(Selected(
                id=e["id"], tier=e["tier"], p=e["p"], d=e["d"], m=e["m"], keep=e["keep"],
                group_size=e.get("group_size"),
                source={"catalog": cat_abs, "entry": e, "build_dir": bdir},
                best_known=_best_summary(e.get("best")), catalog_id=e["id"],
            ))
    for tok in files:
        path = Path(tok)
        if path.is_dir():
            matches = sorted(path.glob("*.npz"))
        else:
            matches = sorted(Path(m) for m in glob.glob(tok)) if any(c in tok for c in "*?[") else [path]
        if not matches:
            raise BenchError(f"no instance file matches {tok!r}: check the path or use a catalog selection (T0, ids)")
        for f in matches:
            header = read_header(f)
            meta = header.get("meta") or {}
            p = int(header["n_groups"])
            out.append(Selected(
                id=str(meta.get("id") or f.stem), tier=str(meta.get("tier") or library.tier_of(p, True)),
                p=p, d=int(header["d"]), m=int(header["m"]), keep=int(header["keep"]),
                group_size=header.get("group_size"), source={"file": str(f.resolve())},
            ))
    seen: dict[str, Selected] = {}
    unique = []
    for s in out:
        if s.id in seen:
            if seen[s.id].source != s.source:
                raise BenchError(f"two selected instances share the id {s.id!r}: rename one file or select only one")
            continue
        seen[s.id] = s
        unique.append(s)
    return unique


def _best_summary(best: dict | None) -> dict | None:
    if not best:
        return None
    return {k: best.get(k) for k in ("err", "bound_err", "status", "solver") if best.get(k) is not None}


def _instance_path(source: dict) -> Path:
    if "file" in source:
        return Path(source["file"])
    from .library import Catalog

    cat = Catalog(Path(source["catalog"]), {"format": "osscar-catalog", "instances": [source["entry"]]})
    build_dir = Path(source["build_dir"]) if source.get("build_dir") else None
    return cat.file_of(source["entry"], build_dir)


def load_task_instance(source: dict):
    """Load the instance a task refers to (checksum-verified)."""
    from .io import load_instance
    from .library import Catalog

    if "file" in source:
        return load_instance(source["file"])
    cat = Catalog(Path(source["catalog"]), {"format": "osscar-catalog", "instances": [source["entry"]]})
    build_dir = Path(source["build_dir"]) if source.get("build_dir") else None
    return cat.instance(source["entry"], build_dir)


# ------------------------------------------------------------ parameters
def parse_params(items: Sequence[str], solver_names: Sequence[str]) -> dict[str, dict]:
    """`-p solver.name=value` (or `-p name=value` with a single solver) into typed Params fields."""
    from .registry import coerce_param, get_solver

    out: dict[str, dict] = {s: {} for s in solver_names}
    for item in items:
        if "=" not in item:
            raise BenchError(f"solver parameters are SOLVER.NAME=VALUE, got {item!r}")
        key, value = (x.strip() for x in item.split("=", 1))
        if "." in key:
            solver, name = key.split(".", 1)
        elif len(solver_names) == 1:
            solver, name = solver_names[0], key
        else:
            raise BenchError(f"with several solvers, prefix the parameter with its solver: -p SOLVER.{key}={value}")
        if solver not in out:
            raise BenchError(f"parameter {item!r} is for solver {solver!r}, which is not in --solvers")
        out[solver][name] = coerce_param(get_solver(solver), name, value)
    return out


# ---------------------------------------------------------- environment
def versions() -> dict:
    """Versions of the numerical packages present here (absent ones are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


_MACHINE: dict | None = None


def machine_info() -> dict:
    global _MACHINE
    if _MACHINE is None:
        from .benchmarks import machine

        _MACHINE = dict(machine())
        _MACHINE["host"] = platform.node()
    return dict(_MACHINE)


def _version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------- run files
def read_rows(path: str | os.PathLike) -> list[dict]:
    """Every complete row of a runs.jsonl file; lines that do not parse (a
    half-written last line from a killed process) are ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / RUNS
    if not path.exists():
        return []
    rows = []
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break  # an unfinished last line
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "instance" in row and "label" in row:
                rows.append(row)
    return rows


def _cut_partial_line(path: Path) -> int:
    """Truncate a trailing line without its newline (left by a killed writer); returns bytes cut."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        block = 1 << 16
        pos = size
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        else:
            keep = 0
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
        return size - keep


class RunWriter:
    """Appends rows to runs.jsonl, one fsynced line each, holding a lock on the folder."""

    def __init__(self, out: Path):
        self.path = out / RUNS
        self._lock = open(out / ".bench.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise BenchError(f"another bench is writing to {out}: wait for it or choose another --out") from None
        _cut_partial_line(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        line = json.dumps(clean_json(row), allow_nan=False, separators=(",", ":"))
        self._fh.write(line + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()


def clean_json(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars and arrays to Python, NaN/Inf to None."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if np is not None:
        if isinstance(obj, np.ndarray):
            return clean_json(obj.tolist())
        if isinstance(obj, np.generic):
            obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _trim_info(info: dict, limit: int = 64) -> dict:
    out = {}
    for k, v in (info or {}).items():
        if k != "trace" and isinstance(v, (list, tuple)) and len(v) > limit:
            out[k] = f"<list of {len(v)} elided>"
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------- rows
def _base_row(task: Task) -> dict:
    return {
        "schema": SCHEMA,
        "instance": task.instance, "tier": task.tier, "p": task.p, "d": task.d, "m": task.m,
        "keep": task.keep, "group_size": task.group_size,
        "source": {k: v for k, v in task.source.items() if k != "entry"} | (
            {"entry": task.source["entry"]["id"]} if "entry" in task.source else {}),
        "solver": task.solver, "label": task.label, "params": task.params,
        "status": None, "objective": None, "err": None, "bound": None, "err_bound": None, "gap": None,
        "support": None, "seconds": None, "prepare_seconds": None, "wall_seconds": None,
        "peak_rss_mb": None, "rss_before_solve_mb": None, "cuda_peak_mb": None,
        "device": task.device, "threads": task.threads, "time_limit": task.time_limit, "grace": task.grace,
        "message": "", "reason": None, "best_known": task.best_known, "info": {},
        "osscar_opt": task.osscar_opt, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _env_row(row: dict) -> dict:
    if "machine" not in row:
        row["machine"] = machine_info()
        row["host"] = row["machine"].get("host")
    if "versions" not in row:
        row["versions"] = versions()
    return row


def _precheck(task: Task) -> dict | None:
    """A SKIPPED row when the solver is unavailable here or skips the instance;
    None when the pair should run (or the check itself failed: the worker reports it)."""
    from .registry import get_solver, make_params

    try:
        cls = get_solver(task.solver)
        ok, reason = cls.available()
        if not ok:
            return _skipped(task, reason)
        if task.device.split(":")[0] not in cls.devices:
            return _skipped(task, f"runs on {'/'.join(cls.devices)} only, not {task.device}")
        params = make_params(cls, task.params)
        inst = load_task_instance(task.source)
        skip, why = cls().skip(inst, params)
        if skip:
            return _skipped(task, why or "the solver skips this instance")
    except Exception:
        return None
    return None


def _skipped(task: Task, reason: str) -> dict:
    row = _base_row(task)
    row.update(status="SKIPPED", reason=reason, message=reason)
    return _env_row(row)


# ---------------------------------------------------------------- worker
def _rss_mb(proc) -> float:
    import psutil

    try:
        p = psutil.Process(proc.pid)
        total = p.memory_info().rss
        for child in p.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20
    except psutil.Error:
        return 0.0


_LIVE: set = set()
_LIVE_LOCK = threading.Lock()
_ABORT = threading.Event()


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def kill_live_workers() -> None:
    """Kill the worker processes this process started and that still run."""
    _ABORT.set()
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        _kill_group(proc)


def run_pair(task: Task | dict) -> dict:
    """Run one pair in a fresh worker process and return its row (never raises).

    This is what --jobs threads and Dask workers execute."""
    if isinstance(task, dict):
        task = Task(**task)
    skipped = _precheck(task)
    if skipped is not None:
        return skipped
    row = _base_row(task)
    _sweep_stale_work_dirs()
    work = Path(tempfile.mkdtemp(prefix=f"osscar-bench-{os.getpid()}-"))
    task_file, result_file, started_file = work / "task.json", work / "result.json", work / "started"
    log_file = work / "worker.log"
    task_file.write_text(json.dumps(clean_json(dataclasses.asdict(task))))
    env = dict(os.environ)
    if task.threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(task.threads)
    env["PYTHONUNBUFFERED"] = "1"
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-c", _BOOT, str(task_file), str(result_file), str(started_file), str(os.getpid())]
    peak = 0.0
    killed = None
    t0 = time.perf_counter()
    try:
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        with _LIVE_LOCK:
            _LIVE.add(proc)
        solve_start = None
        polls = 0
        try:
            while proc.poll() is None:
                now = time.perf_counter()
                if solve_start is None and started_file.exists():
                    solve_start = now
                if solve_start is not None and now - solve_start > task.time_limit + task.grace:
                    killed = "time"
                elif solve_start is None and now - t0 > STARTUP_TIMEOUT_S + task.grace:
                    killed = "startup"
                polls += 1
                if task.memory_limit_mb or polls % 10 == 1:
                    rss = _rss_mb(proc)
                    peak = max(peak, rss)
                    if task.memory_limit_mb and rss > task.memory_limit_mb:
                        killed = "memory"
                if _ABORT.is_set():
                    killed = "abort"
                if killed:
                    _kill_group(proc)
                    proc.wait()
                    break
                time.sleep(POLL_S)
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
        wall = time.perf_counter() - t0
        row["wall_seconds"] = wall
        if killed is None and result_file.exists():
            try:
                result = json.loads(result_file.read_text())
            except ValueError:
                result = None
            if result is not None:
                row.update(result)
                row["wall_seconds"] = wall
                if row.get("peak_rss_mb") is None and peak:
                    row["peak_rss_mb"] = peak
                return _env_row(row)
        elapsed = None if solve_start is None else time.perf_counter() - solve_start
        row["peak_rss_mb"] = peak or None
        row["seconds"] = elapsed
        if killed == "time":
            row.update(status="TIME_LIMIT", message=(
                f"killed by the harness {task.time_limit + task.grace:.3g} s after the solve started "
                f"(time limit {task.time_limit:g} s + grace {task.grace:g} s): the solver ignored its time limit"))
        elif killed == "memory":
            row.update(status="ERROR", message=(
                f"killed by the harness: resident memory passed --memory-limit ({task.memory_limit_mb:.0f} MB)"))
        elif killed == "startup":
            row.update(status="ERROR", message=f"the worker did not start solving within {STARTUP_TIMEOUT_S:.0f} s")
        elif killed == "abort":
            row.update(status="ERROR", message="the bench was interrupted")
        else:
            code = proc.returncode
            how = f"signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exit code {code}"
            if code == -signal.SIGKILL:
                how += ", perhaps killed for memory"
            row.update(status="ERROR", message=f"the worker died with {how}: {_tail(log_file)}")
        return _env_row(row)
    except Exception as exc:  # the harness itself must go on
        row.update(status="ERROR", message=f"harness: {type(exc).__name__}: {exc}",
                   wall_seconds=time.perf_counter() - t0)
        return _env_row(row)
    finally:
        for f in (task_file, result_file, started_file, log_file):
            try:
                f.unlink()
            except OSError:
                pass
        try:
            work.rmdir()
        except OSError:
            pass


_SWEPT = False


def _sweep_stale_work_dirs(again: bool = False) -> None:
    """Remove the per-run folders that a killed bench (its pid is gone) left in the temp dir
    (once per process, or `again`)."""
    global _SWEPT
    if _SWEPT and not again:
        return
    _SWEPT = True
    import shutil

    import psutil

    for path in Path(tempfile.gettempdir()).glob("osscar-bench-*-*"):
        pid = path.name.split("-")[2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _tail(path: Path, lines: int = 4, chars: int = 600) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no output"
    for i, line in enumerate(text):  # faulthandler's report of a crash in native code
        if line.startswith("Fatal Python error"):
            frames = [f.strip() for f in text[i + 1:] if f.strip().startswith("File ")][:2]
            return " | ".join([line.strip()] + frames)[:chars]
    tail = " | ".join(line.strip() for line in text[-lines:] if line.strip())
    return (tail[-chars:] if tail else "no output")


# The worker's first lines: ask Linux to kill it when the dispatching thread dies
# (PR_SET_PDEATHSIG), before the seconds spent importing torch, then run.
_BOOT = """
import faulthandler, os, signal, sys
faulthandler.enable()
try:
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
except Exception:
    pass
if os.getppid() != int(sys.argv[4]):
    os._exit(1)
from osscar_opt.harness import worker_main
sys.exit(worker_main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


def _set_parent_death_signal(parent_pid: int) -> None:
    """Linux: die with the process that started us, so a killed bench leaves no orphans."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)


def worker_main(task_file: str, result_file: str, started_file: str, parent_pid: int) -> int:
    """Inside the worker process: load, check, solve, measure, write the result."""
    import resource

    _set_parent_death_signal(parent_pid)
    task = Task(**json.loads(Path(task_file).read_text()))
    out: dict[str, Any] = {}
    try:
        import torch

        if task.threads:
            torch.set_num_threads(int(task.threads))
        from .registry import get_solver, make_params, solve

        inst = load_task_instance(task.source)
        cls = get_solver(task.solver)
        ok, reason = cls.available()
        params = make_params(cls, task.params) if ok else None
        skip, why = (True, reason) if not ok else cls().skip(inst, params)
        if skip:
            out.update(status="SKIPPED", reason=why, message=why)
        else:
            cuda = task.device.startswith("cuda") and torch.cuda.is_available()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            out["rss_before_solve_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            Path(started_file).touch()
            sol = solve(inst, task.solver, device=task.device, time_limit=task.time_limit, **task.params)
            d = sol.to_dict()
            out.update(
                status=d["status"], objective=d["objective"], err=d["err"], bound=d["bound"],
                err_bound=d["err_bound"], gap=d["gap"], support=d["keep"], seconds=d["seconds"],
                prepare_seconds=d["prepare_seconds"], device=d["device"], message=d["message"],
                info=_trim_info(d["info"]), params=task.params,
            )
            if cuda:
                out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception as exc:
        out.update(status="ERROR", message=f"{type(exc).__name__}: {exc}")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["machine"] = machine_info()
    out["host"] = out["machine"].get("host")
    out["versions"] = versions()
    tmp = Path(result_file + ".tmp")
    tmp.write_text(json.dumps(clean_json(out), allow_nan=False))
    os.replace(tmp, result_file)
    return 0


# ----------------------------------------------------------------- bench
@dataclass
class BenchSettings:
    time_limit: float
    device: str
    grace: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_settings(out: Path, settings: BenchSettings) -> None:
    path = out / SETTINGS
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if isinstance(old, dict):
            for name in ("time_limit", "device"):
                if old.get(name) != getattr(settings, name):
                    raise BenchError(
                        f"{out} holds runs with {name.replace('_', '-')}={old.get(name)}, not "
                        f"{getattr(settings, name)}: rerun with --{name.replace('_', '-')} {old.get(name)} "
                        "or choose a new --out")
    from .library import write_json_atomic

    write_json_atomic(path, {"format": "osscar-bench", "schema": SCHEMA, **settings.to_dict()})


@dataclass
class BenchResult:
    out: Path
    ran: list[dict] = field(default_factory=list)  # rows written by this call
    skipped_existing: int = 0  # pairs already in runs.jsonl
    missing: list[str] = field(default_factory=list)  # selected instances not built
    catalog_changes: list[str] = field(default_factory=list)
    catalog_rejected: list[str] = field(default_factory=list)


def bench(
    instances: Sequence[str],
    solvers: Sequence[str],
    out: str | os.PathLike,
    time_limit: float = 60.0,
    jobs: int = 1,
    scheduler: str | None = None,
    device: str = "cpu",
    params: Sequence[str] = (),
    grace: float = 10.0,
    memory_limit_gb: float | None = None,
    threads: int | None = None,
    catalog: str | os.PathLike | None = None,
    build_dir: str | os.PathLike | None = None,
    update_catalog: bool = False,
    progress: bool = True,
) -> BenchResult:
    """Run every (instance, solver) pair not yet in `out`/runs.jsonl; see the module doc."""
    from .registry import device_problem, get_solver

    if not (isinstance(time_limit, (int, float)) and time_limit > 0 and math.isfinite(time_limit)):
        raise BenchError(f"--time-limit must be a positive number of seconds, got {time_limit!r}")
    if grace < 0:
        raise BenchError(f"--grace must be >= 0 seconds, got {grace!r}")
    if jobs < 1:
        raise BenchError(f"--jobs must be at least 1, got {jobs}")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise BenchError(f"--device must be cpu or cuda, got {device!r}")
    names = [s.strip() for s in (solvers if not isinstance(solvers, str) else solvers.split(",")) if s.strip()]
    if not names:
        raise BenchError("--solvers is empty: name at least one solver (see `osscar-opt solvers`)")
    if len(set(names)) != len(names):
        raise BenchError(f"--solvers names a solver twice: {','.join(names)}")
    for name in names:
        get_solver(name)  # one-line error for an unknown name
    problem = None if scheduler is not None else device_problem(device, use_cpu="--device cpu")
    if problem:  # a Dask cluster's workers may have the GPU this machine lacks
        raise BenchError(f"--device {device}: {problem}")
    solver_params = parse_params(params, names)
    selected = select_instances(instances, catalog, build_dir)
    result = BenchResult(Path(out))
    runnable = []
    for s in selected:
        if "file" in s.source:
            runnable.append(s)
            continue
        if _instance_path(s.source).exists():
            runnable.append(s)
        else:
            result.missing.append(s.id)
    if not runnable:
        raise BenchError(
            f"none of the {len(selected)} selected instances is built: run `osscar-opt instances build "
            f"--select {','.join(result.missing[:3])}{',...' if len(result.missing) > 3 else ''}`")
    if result.missing and progress:
        print(f"note: {len(result.missing)} selected instances are not built and are left out "
              f"(build them with `osscar-opt instances build --select ...`): {', '.join(result.missing[:5])}"
              f"{' ...' if len(result.missing) > 5 else ''}", file=sys.stderr)

    if update_catalog and not any(s.catalog_id for s in runnable):
        raise BenchError("--update-catalog needs instances selected from the catalog (T0, ids), not files")
    out = Path(out)
    writable_folder(out)
    settings = BenchSettings(float(time_limit), device, float(grace))
    writer = RunWriter(out)
    try:
        _check_settings(out, settings)
        done = {(r["instance"], r["label"]) for r in read_rows(out / RUNS)}
        if threads is None and scheduler is None:
            threads = max(1, (os.cpu_count() or 1) // jobs)
        version = _version()
        tasks = []
        for s in runnable:
            for name in names:
                cls = get_solver(name)
                dev = device if device.split(":")[0] in cls.devices else "cpu"
                task = Task(
                    instance=s.id, tier=s.tier, p=s.p, d=s.d, m=s.m, keep=s.keep, group_size=s.group_size,
                    source=s.source, solver=name, label=label_of(name, solver_params[name]),
                    params=solver_params[name], device=dev, time_limit=float(time_limit), grace=float(grace),
                    memory_limit_mb=None if memory_limit_gb is None else 1024.0 * memory_limit_gb,
                    threads=threads, best_known=s.best_known, osscar_opt=version,
                )
                if task.key() in done:
                    result.skipped_existing += 1
                else:
                    tasks.append(task)
        if progress and result.skipped_existing:
            print(f"resuming: {result.skipped_existing} pairs already in {out / RUNS}, {len(tasks)} to run")
        total = len(tasks)

        def record(row: dict) -> None:
            writer.write(row)
            result.ran.append(row)
            if progress:
                print(_progress_line(len(result.ran), total, row), flush=True)

        if tasks:
            _sweep_stale_work_dirs(again=True)
            if scheduler:
                _run_dask(tasks, scheduler, record)
            else:
                _run_local(tasks, jobs, record)
    finally:
        writer.close()
    if update_catalog:
        update_catalog_from(out, catalog, build_dir, result)
        if progress:
            print(f"catalog: {len(result.catalog_changes)} entries improved"
                  + (f", {len(result.catalog_rejected)} rows rejected by the evaluator" if result.catalog_rejected else ""))
    if progress:
        counts = {}
        for r in result.ran:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing new"
        print(f"{len(result.ran)} runs ({summary}) in {out / RUNS}; tables and plots: osscar-opt report {out}")
    return result


def _progress_line(i: int, total: int, row: dict) -> str:
    err = f"err {row['err']:.6g}" if row.get("err") is not None else ""
    gap = f" gap {100 * row['gap']:.3g}%" if row.get("gap") is not None else ""
    sec = f" {row['seconds']:.3g} s" if row.get("seconds") is not None else ""
    extra = f"  ({row['message'][:120]})" if row["status"] in ("ERROR", "SKIPPED") and row.get("message") else ""
    return f"[{i}/{total}] {row['instance']}  {row['label']}  {row['status']}  {err}{gap}{sec}{extra}"


def _run_local(tasks: list[Task], jobs: int, record) -> None:
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    _ABORT.clear()
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="osscar-bench")
    try:
        pending = {pool.submit(run_pair, t) for t in tasks}
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in finished:
                record(fut.result())
    except BaseException:
        kill_live_workers()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _run_dask(tasks: list[Task], scheduler: str, record) -> None:
    try:
        from dask.distributed import Client, as_completed
    except ImportError:
        raise BenchError("--scheduler needs dask.distributed: pip install 'osscar-opt[bench]'") from None
    try:
        client = Client(scheduler, timeout="20s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise BenchError(f"cannot reach the Dask scheduler at {scheduler} ({exc}): check the address") from None
    futures = []
    _ABORT.clear()
    try:
        for t in tasks:
            futures.append(client.submit(run_pair, dataclasses.asdict(t), pure=False,
                                         key=f"osscar-bench-{t.instance}-{t.label}-{os.getpid()}-{time.time_ns()}"))
        for fut in as_completed(futures, loop=client.loop):
            try:
                row = fut.result()
            except Exception as exc:  # a Dask worker lost mid-task
                task = tasks[futures.index(fut)]
                row = _env_row(_base_row(task))
                row.update(status="ERROR", message=f"dask: {type(exc).__name__}: {exc}")
            record(row)
    except BaseException:
        client.cancel(futures)
        kill_live_workers()  # workers started from this process (an in-process cluster)
        raise
    finally:
        client.close()


# --------------------------------------------------------------- catalog
def update_catalog_from(out: str | os.PathLike, catalog_path: str | os.PathLike | None = None,
                        build_dir: str | os.PathLike | None = None, result: BenchResult | None = None) -> BenchResult:
    """Record the best supports and bounds of `out`/runs.jsonl in the catalog.

    Every support is re-evaluated here with the fp64 evaluator; a row whose
    support is infeasible or whose recorded err disagrees with the evaluator
    is rejected. `Catalog.update_best` then keeps only improvements."""
    import numpy as np

    from .evaluate import evaluate
    from .library import Catalog

    result = result or BenchResult(Path(out))
    catalog = Catalog.load(catalog_path)
    ids = {e["id"] for e in catalog.entries}
    rows = [r for r in read_rows(Path(out) / RUNS)
            if r.get("instance") in ids and r.get("support") and r.get("status") in ("OPTIMAL", "FEASIBLE", "TIME_LIMIT")
            and "catalog" in (r.get("source") or {})]
    # best first (a proof first among equals), so the solver credited is the one that proved it
    rows.sort(key=lambda r: (r["instance"], r["err"] if r.get("err") is not None else np.inf,
                             r.get("status") != "OPTIMAL"))
    instances: dict[str, Any] = {}
    changed = set()
    for r in rows:
        iid = r["instance"]
        entry = catalog.entry(iid)
        try:
            if iid not in instances:
                instances[iid] = catalog.instance(entry, Path(build_dir) if build_dir else None)
            inst = instances[iid]
            ev = evaluate(inst, r["support"], weights=False)
        except OsscarError as exc:
            result.catalog_rejected.append(f"{iid} {r['label']}: {exc}")
            continue
        if not ev.feasible or r.get("err") is None or abs(ev.err - float(r["err"])) > ERR_TOL * max(1.0, abs(ev.err)):
            result.catalog_rejected.append(
                f"{iid} {r['label']}: recorded err {r.get('err')} not confirmed by the evaluator "
                f"(err {ev.err:.12g}, {'feasible' if ev.feasible else 'infeasible'})")
            continue
        bound_err = r.get("err_bound")
        if bound_err is not None and bound_err > ev.err + 1e-9:
            bound_err = None
        if catalog.update_best(iid, inst, ev.keep, r["solver"], bound_err=bound_err,
                               proven=r["status"] == "OPTIMAL"):
            changed.add(iid)
    if changed:
        catalog.save()
    result.catalog_changes = sorted(changed)
    return result


# ----------------------------------------------------------------- main
if __name__ == "__main__":  # the worker entry point: python -m osscar_opt.harness worker ...
    if len(sys.argv) == 6 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
    print("usage: python -m osscar_opt.harness worker TASK RESULT STARTED PARENT_PID (started by osscar-opt bench)",
          file=sys.stderr)
    sys.exit(2)
