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
