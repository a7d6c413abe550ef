"""Speed and scale of OSSCAR: `osscar-opt bench-speed`.

Instances (DESIGN.md section 5):
  * SmolLM2-135M layer 10 down_proj from the instance library (p = 1536, keep 768);
  * synthetic layers of width d (OPT fc2 shapes: m = d/4, keep d/2):
        H = X'X/n + 0.01 mean(diag(X'X/n)) I,   X = Z A' + 0.3 E,
        Z (n x d/4), A (d x d/4), E (n x d) standard Gaussian, n = 16384,
        W_hat (d x m) standard Gaussian,
    drawn with torch's generator seeded by `seed + d` (on the device).

For each instance: one untimed warm-up solve, then `repeats` timed solves;
the greedy and the local search are timed separately (both inside the timed
`run`, set-up excluded), the median is reported with the peak memory (CPU
RSS of the process; CUDA max allocated) and the err from the fp64 evaluator.
Writes results/speed.md, results/speed.json and results/speed.png (time
versus d with the fitted growth exponent).
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..instance import Instance
from ..registry import solve
from . import RESULTS, machine, machine_line

PUBLISHED = {
    ("smollm2-l10-down", "cpu"): {"greedy": "1.4-1.7", "total": "1.9-3.1", "err": 0.07760},
    ("smollm2-l10-down", "cuda"): {"greedy": "0.75", "total": "0.83", "err": 0.07760},
    ("opt-2.7b-fc2", "cuda"): {"greedy": "2.4-2.7", "total": "14.1", "err": 0.00927},
    ("opt-13b-fc2", "cuda"): {"greedy": "13.1", "total": "-", "err": 0.00940},
    ("opt-30b-fc2", "cuda"): {"greedy": "31.9", "total": "-", "err": 0.00942},
}
NAMED = {10240: "opt-2.7b-fc2", 20480: "opt-13b-fc2", 28672: "opt-30b-fc2"}


def synthetic(d: int, n: int = 16384, seed: int = 0, device: Any = "cpu") -> Instance:
    """The synthetic layer of width d described in the module docstring."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed + d)
    r = max(1, d // 4)
    gram = torch.zeros(d, d, dtype=torch.float64, device=dev)
    A = torch.randn(d, r, generator=g, dtype=torch.float64, device=dev)
    step = max(1, min(n, (1 << 27) // d))  # bounded memory: X in row chunks
    for a in range(0, n, step):
        rows = min(step, n - a)
        X = torch.randn(rows, r, generator=g, dtype=torch.float64, device=dev) @ A.T
        X += 0.3 * torch.randn(rows, d, generator=g, dtype=torch.float64, device=dev)
        gram.addmm_(X.T, X)
        del X
    gram /= n
    gram.diagonal().add_(0.01 * gram.diagonal().mean())
    W = torch.randn(d, d // 4, generator=g, dtype=torch.float64, device=dev)
    H = gram.cpu().numpy()
    del gram, A
    return Instance(H, W.cpu().numpy(), d // 2, meta={"id": NAMED.get(d, f"synthetic-d{d}"), "seed": seed, "n": n})


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_instance(inst: Instance, device: str, repeats: int, local_search: bool = True, **params) -> dict:
    dev = torch.device(device)
    solve(inst, "osscar", device=device, local_search=local_search, **params)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    runs = [solve(inst, "osscar", device=device, local_search=local_search, **params) for _ in range(repeats)]
    row = {
        "instance": inst.meta.get("id"), "d": inst.d, "m": inst.m, "keep": inst.keep, "device": device,
        "greedy_seconds": statistics.median(r.info["greedy_seconds"] for r in runs),
        "total_seconds": statistics.median(r.seconds for r in runs),
        "err": runs[0].err, "greedy_err": None, "repeats": repeats,
        "single_swaps": runs[0].info.get("single_swaps", 0), "multi_swaps": runs[0].info.get("multi_swaps", 0),
        "peak_cpu_rss_gb": _peak_rss_gb(),
    }
    row["local_search_seconds"] = statistics.median(r.info.get("local_search_seconds", 0.0) for r in runs)
    if dev.type == "cuda":
        row["peak_cuda_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    from ..evaluate import evaluate

    row["greedy_err"] = evaluate(inst, runs[0].info["greedy_keep"], weights=False).err
    return row


def run(devices: Sequence[str] | None = None, sizes: Sequence[int] | None = None, repeats: int = 3,
        out: str | Path | None = None, local_search_max_d: int = 12000) -> list[dict]:
    from .. import library

    devices = list(devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]))
    rows: list[dict] = []
    catalog = library.Catalog.load()
    entry = catalog.entry("smollm2-l10-neurons-k768")
    if not catalog.file_of(entry).exists():
        library.build([entry["recipe"]])
    layer = catalog.instance(entry)
    layer.meta["id"] = "smollm2-l10-down"
    for device in devices:
        row = time_instance(layer, device, repeats)
        rows.append(row)
        _print(row)
        for d in sizes or ((1024, 2048, 4096, 10240, 20480, 28672) if device.startswith("cuda") else (1024, 2048, 4096)):
            inst = synthetic(d, device=device)
            row = time_instance(inst, device, repeats if d <= 8192 else 1, local_search=d <= local_search_max_d)
            rows.append(row)
            _print(row)
            del inst
            gc.collect()
    _write(rows, Path(out) if out else RESULTS)
    return rows


def _print(row: dict) -> None:
    extra = f", peak CUDA {row['peak_cuda_gb']:.1f} GB" if "peak_cuda_gb" in row else ""
    print(f"{row['instance']:<18} d={row['d']:<6} {row['device']:<5} greedy {row['greedy_seconds']:.3f} s "
          f"(err {row['greedy_err']:.6f})  greedy+LS {row['total_seconds']:.3f} s (err {row['err']:.6f}), "
          f"peak RSS {row['peak_cpu_rss_gb']:.1f} GB{extra}")


def growth_exponent(ds: Sequence[int], secs: Sequence[float]) -> float:
    """Slope of log(seconds) against log(d)."""
    if len(ds) < 2:
        return float("nan")
    return float(np.polyfit(np.log(ds), np.log(secs), 1)[0])


def _write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    lines = [
        "# OSSCAR speed and scale",
        "",
        f"Machine: {machine_line(info)}. Command: `osscar-opt bench-speed`.",
        "Median of timed solves after a warm-up; set-up (device transfer, permutation) excluded, every",
        "factorization included. err from the fp64 evaluator. Published: the OSSCAR code's figures (DESIGN.md section 5).",
        "",
        "| instance | d | m | device | greedy s | greedy err | greedy + LS s | err | published greedy s | published total s | published err | peak RSS GB | peak CUDA GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pub = PUBLISHED.get((r["instance"], r["device"].split(":")[0]), {})
        lines.append(
            f"| {r['instance']} | {r['d']} | {r['m']} | {r['device']} | {r['greedy_seconds']:.3f} | {r['greedy_err']:.6f} "
            f"| {r['total_seconds']:.3f} | {r['err']:.6f} | {pub.get('greedy', '-')} | {pub.get('total', '-')} "
            f"| {pub.get('err', '-')} | {r['peak_cpu_rss_gb']:.1f} | {r.get('peak_cuda_gb', float('nan')):.1f} |")
    lines.append("")
    for device in sorted({r["device"] for r in rows}):
        syn = [r for r in rows if r["device"] == device and r["instance"] != "smollm2-l10-down"]
        if len(syn) >= 2:
            k = growth_exponent([r["d"] for r in syn], [r["greedy_seconds"] for r in syn])
            lines.append(f"Greedy time on {device} grows as d^{k:.2f} over d = {syn[0]['d']}..{syn[-1]['d']}.")
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    (out / "speed.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for device in sorted({r["device"] for r in rows}):
            syn = [r for r in rows if r["device"] == device and r["instance"] != "smollm2-l10-down"]
            if not syn:
                continue
            ds = [r["d"] for r in syn]
            secs = [r["greedy_seconds"] for r in syn]
            ax.loglog(ds, secs, "o-", label=f"{device} greedy (d^{growth_exponent(ds, secs):.2f})")
        ax.set_xlabel("d (input rows)")
        ax.set_ylabel("seconds")
        ax.set_title("OSSCAR greedy time versus layer width")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "speed.png", dpi=120)
        plt.close(fig)
    except ImportError:
        pass


__all__ = ["run", "synthetic", "time_instance", "growth_exponent"]
