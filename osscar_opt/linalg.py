"""Small dense linear-algebra kernels shared by the solvers (torch, any device)."""

from __future__ import annotations

import torch

from .errors import SolverError


def output_factor(G: torch.Tensor) -> torch.Tensor:
    """F (d x r, r <= min(d, m)) with F F' = G G'.

    f(S) depends on G only through G G' (DESIGN.md section 1), so solvers that
    evaluate many supports work with F instead of the m output columns.
    """
    d, m = G.shape
    if m <= d:
        return G
    R = torch.linalg.qr(G.T, mode="r").R  # G' = Q R  =>  G G' = R' R
    return R.T


def batched_objectives(H: torch.Tensor, F: torch.Tensor, idx: torch.Tensor, batch_bytes: int = 1 << 28) -> torch.Tensor:
    """f(S) = -0.5 ||L_S^-1 F_S||^2 for a batch of supports given as (B, rows) indices."""
    B, k = idx.shape
    out = torch.empty(B, dtype=H.dtype, device=H.device)
    if k == 0:
        return out.zero_()
    step = max(1, batch_bytes // (8 * k * (k + F.shape[1])))
    for a in range(0, B, step):
        ix = idx[a : a + step]
        L, info = torch.linalg.cholesky_ex(H[ix[:, :, None], ix[:, None, :]])
        if bool((info != 0).any()):
            raise SolverError("H restricted to a support is not positive definite: rebuild the instance with damping")
        Y = torch.linalg.solve_triangular(L, F[ix], upper=False)
        out[a : a + step] = -0.5 * (Y * Y).sum((1, 2))
    return out


def busy_elsewhere(samples: int = 3, gap: float = 0.001) -> int | None:
    """Threads of other processes running right now (Linux), None where it cannot be read.

    procs_running of /proc/stat (runnable threads machine-wide) less this
    process's own runnable threads (its OpenMP workers spin for a while after
    each parallel region), the least over a few samples a millisecond apart,
    so that only steady load counts.
    """
    import os
    import time

    least = None
    try:
        for i in range(samples):
            if i:
                time.sleep(gap)
            with open("/proc/stat") as fh:
                total = next(int(line.split()[1]) for line in fh if line.startswith("procs_running"))
            own = 0
            for task in os.listdir("/proc/self/task"):
                try:
                    with open(f"/proc/self/task/{task}/stat") as fh:
                        own += fh.read().rsplit(")", 1)[1].split()[0] == "R"
                except OSError:  # the thread ended meanwhile
                    pass
            others = max(0, total - max(own, 1))
            least = others if least is None else min(least, others)
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return least


def spare_thread_cap() -> int | None:
    """A CPU thread cap below torch's thread count when other processes keep cores busy
    (torch's threads less the busy cores, at least 1), else None (where the load cannot be
    read, too). More threads than free cores make OpenMP spin as it waits: OSSCAR on a
    1536-row layer with one core of two busy took 1.3 s on two threads, 0.5 s on one."""
    import os

    import torch

    busy = busy_elsewhere()
    if not busy:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    cap = max(1, min(torch.get_num_threads(), cores - busy))
    return cap if cap < torch.get_num_threads() else None


class cpu_threads:
    """Context manager: at most `n` CPU threads for torch and BLAS inside, restored after.

    Small problems are many small dense factorizations: several threads per
    call gain nothing there, and on a machine whose cores are busy they
    oversubscribe them and run many times slower (seen: 44 s instead of
    0.17 s for OSSCAR on a 30-group crop while two other processes ran).
    n=None leaves the process settings alone.
    """

    def __init__(self, n: int | None):
        self.n = n
        self._torch = None
        self._limits = None

    def __enter__(self):
        if self.n is None:
            return self
        import torch

        # threadpoolctl also caps torch's OpenMP pool: record both before changing either,
        # and restore in the reverse order, so that torch gets its own setting back
        self._torch = torch.get_num_threads()
        try:
            from threadpoolctl import threadpool_limits

            self._limits = threadpool_limits(int(self.n))
        except ImportError:  # optional: numpy keeps its own threads
            self._limits = None
        torch.set_num_threads(int(self.n))
        return self

    def __exit__(self, *exc):
        if self._limits is not None:
            self._limits.restore_original_limits()
        if self._torch is not None:
            import torch

            torch.set_num_threads(self._torch)
        return False
