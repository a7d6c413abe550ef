"""Speed and scale of OSSCAR: `osscar-opt bench-speed`.

Instances (DESIGN.md section 5):
  * SmolLM2-135M layer 10 down_proj from the instance library (p = 1536, keep 768);
  * synthetic layers of width d (OPT fc2 shapes: m = d/4, keep d/2):
        H = X'X/n + 0.01 mean(diag(X'X/n)) I,   X = Z A' + 0.3 E,
        Z (n x d/4), A (d x d/4), E (n x d) standard Gaussian, n = 16384,
        W_hat (d x m) standard Gaussian,
    drawn with torch's generator seeded by `seed + d` (on the device).

Widths: d = 1024, 2048, 4096 on the CPU; up to 10240, 20480, 28672 (the
OPT-2.7B, 13B and 30B fc2 shapes) on CUDA.

For each instance: one untimed warm-up solve (greedy only above d = 8192),
then `repeats` timed solves (one above d = 8192); the greedy and the local
search are timed separately (both inside the timed `run`, set-up excluded),
the median is reported with the peak memory (CPU RSS of the process; CUDA
max allocated, reset after the warm-up) and the err from the fp64 evaluator
(on the GPU for CUDA runs). Each row records its machine, dtype and mode and
is written as soon as it is measured, merged with the rows of other
machines, devices or dtypes already in speed.json, so CPU and GPU figures
measured on different machines share one table. Writes results/speed.md,
results/speed.json and results/speed.png (greedy time versus d with the
fitted growth exponent).
"""

from __future__ import annotations

import gc
import hashlib
import json
import resource
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..instance import Instance
from ..io import atomic_write, atomic_write_json, writable_folder
from ..registry import Status, solve
from . import RESULTS, machine, machine_line

PUBLISHED = {  # DESIGN.md section 5; err is greedy -> greedy + local search where both were run
    ("smollm2-l10-down", "cpu"): {"greedy": "1.4-1.7", "total": "1.9-3.1", "err": "0.07762 -> 0.07760"},
    ("smollm2-l10-down", "cuda"): {"greedy": "0.75", "total": "0.83", "err": "0.07762 -> 0.07760"},
    ("opt-2.7b-fc2", "cuda"): {"greedy": "2.4-2.7", "total": "14.1", "err": "0.00929 -> 0.00927"},
    ("opt-13b-fc2", "cuda"): {"greedy": "13.1", "total": "-", "err": "0.00940"},
    ("opt-30b-fc2", "cuda"): {"greedy": "31.9 (29 GB peak)", "total": "-", "err": "0.00942"},
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


def time_instance(inst: Instance, device: str, repeats: int, local_search: bool = True,
                  full_warmup: bool = True, time_limit: float | None = None, **params) -> dict:
    """Median timings of `repeats` solves after one warm-up (greedy only when
    `full_warmup` is False: the large widths, where kernels are warm already)."""
    dev = torch.device(device)
    solve(inst, "osscar", device=device, local_search=local_search and full_warmup, **params)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    runs = [solve(inst, "osscar", device=device, local_search=local_search, time_limit=time_limit, **params)
            for _ in range(repeats)]
    for r in runs:
        if r.status == Status.ERROR:
            raise RuntimeError(f"osscar failed on {inst.meta.get('id')} ({device}): {r.message}")
    row = {
        "instance": inst.meta.get("id"), "d": inst.d, "m": inst.m, "keep": inst.keep, "device": device,
        "dtype": params.get("dtype", "float64"), "local_search": local_search,
        "low_memory": bool(params.get("low_memory", False)),
        "ls_timed_out": any(r.info.get("timed_out", False) for r in runs),
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

    row["greedy_err"] = evaluate(inst, runs[0].info["greedy_keep"], weights=False,
                                 device=device if dev.type == "cuda" else None).err
    row["keep_sha1"] = hashlib.sha1(np.sort(runs[0].keep).astype(np.int64).tobytes()).hexdigest()
    info = machine()
    row["machine"] = machine_line(info)
    row["machine_short"] = info.get("gpu") if dev.type == "cuda" else f"{info['cores']}-core CPU"
    return row


def run(devices: Sequence[str] | None = None, sizes: Sequence[int] | None = None, repeats: int = 3,
        out: str | Path | None = None, local_search_max_d: int | None = None, dtype: str = "float64",
        layer: bool = True, low_memory: bool = False, time_limit: float | None = None) -> list[dict]:
    """Time OSSCAR on the SmolLM2 layer and the synthetic widths; each row is
    written as soon as it is measured (merged into out/speed.json with the
    rows of other devices, dtypes or machines measured earlier)."""
    from .. import library

    out = writable_folder(Path(out) if out else RESULTS)
    devices = list(devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]))
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        _print(row)
        _write(rows, out)

    if layer:
        catalog = library.Catalog.load()
        entry = catalog.entry("smollm2-l10-neurons-k768")
        if not catalog.file_of(entry).exists():
            library.build([entry["recipe"]])
        smol = catalog.instance(entry)
        smol.meta["id"] = "smollm2-l10-down"
    for device in devices:
        if layer:
            record(time_instance(smol, device, repeats, dtype=dtype, low_memory=low_memory, time_limit=time_limit))
        for d in sizes or ((1024, 2048, 4096, 10240, 20480, 28672) if device.startswith("cuda") else (1024, 2048, 4096)):
            inst = synthetic(d, device=device)
            big = d > 8192
            ls = local_search_max_d is None or d <= local_search_max_d
            record(time_instance(inst, device, 1 if big else repeats, local_search=ls, full_warmup=not big, dtype=dtype,
                                 low_memory=low_memory, time_limit=time_limit))
            del inst
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


def _series(row: dict) -> tuple:
    """Rows measured the same way on the same machine: one line of the plot."""
    return (row["machine_short"], row["device"], row["dtype"], row["low_memory"])


def _key(row: dict) -> tuple:
    return (row["instance"], *_series(row))


def _print(row: dict) -> None:
    extra = f", peak CUDA {row['peak_cuda_gb']:.1f} GB" if "peak_cuda_gb" in row else ""
    print(f"{row['instance']:<18} d={row['d']:<6} {row['device']:<5} {row['dtype']} "
          f"greedy {row['greedy_seconds']:.3f} s (err {row['greedy_err']:.6f})  greedy+LS {row['total_seconds']:.3f} s "
          f"(err {row['err']:.6f}, {row['single_swaps']} swaps), peak RSS {row['peak_cpu_rss_gb']:.1f} GB{extra}", flush=True)


def growth_exponent(ds: Sequence[int], secs: Sequence[float]) -> float:
    """Slope of log(seconds) against log(d)."""
    if len(ds) < 2:
        return float("nan")
    return float(np.polyfit(np.log(ds), np.log(secs), 1)[0])


def _fit_rows(rows: list[dict]) -> list[dict]:
    """The rows the growth exponent is fitted on: d >= 4096 when there are two
    such (small widths on a GPU are launch-bound and flat), else all."""
    large = [r for r in rows if r["d"] >= 4096]
    return large if len(large) >= 2 else rows


def _merged(rows: list[dict], out: Path) -> list[dict]:
    """`rows` plus the rows of out/speed.json that they do not replace."""
    path = out / "speed.json"
    old: list[dict] = []
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            old = saved["rows"]
            for r in old:  # rows from before machines were recorded per row
                if "machine" not in r:
                    r["machine"] = machine_line(saved["machine"])
                    r["machine_short"] = f"{saved['machine']['cores']}-core CPU"
        except (ValueError, KeyError, TypeError):
            old = []
    for r in old + rows:  # rows from before dtype and mode were recorded
        r.setdefault("dtype", "float64")
        r.setdefault("low_memory", False)
    new = {_key(r) for r in rows}
    return [r for r in old if _key(r) not in new] + rows


def _write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = _merged(rows, out)
    machines = sorted({r["machine"] for r in rows})
    lines = [
        "# OSSCAR speed and scale",
        "",
        "Command: `osscar-opt bench-speed` (options: --device, --sizes, --dtype, --low-memory, --time-limit, --local-search-max-d).",
        "Median of timed solves after a warm-up (one timed solve for d > 8192, after a greedy-only warm-up);",
        "set-up (device transfer, permutation) excluded, every factorization included. err from the fp64",
        "evaluator. Published: the OSSCAR code's figures (DESIGN.md section 5), measured on its own draw of",
        "the synthetic shapes (ours: torch's generator seeded with d), so err compares only roughly there.",
        "float32 keeps the fp64 local-search tolerance scaled to float32 round-off (1e-6 of |f(all)|),",
        "larger than single swap gains at these widths: it stops after the greedy. Machines:",
        "",
        *[f"- {m}" for m in machines],
        "",
        "| instance | d | m | machine | device | dtype | greedy s | greedy err | greedy + LS s | err | swaps "
        "| support = fp64's | published greedy s | published total s | published err | peak RSS GB | peak CUDA GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fp64 = {(r["instance"], r["machine_short"], r["device"]): r.get("keep_sha1")
            for r in rows if r["dtype"] == "float64" and not r["low_memory"]}
    rows = sorted(rows, key=lambda r: (*_series(r), r["instance"] != "smollm2-l10-down", r["d"]))
    for r in rows:
        ref = fp64.get((r["instance"], r["machine_short"], r["device"]))
        plain = r["dtype"] == "float64" and not r["low_memory"]
        same = "-" if plain or not ref or "keep_sha1" not in r else ("yes" if ref == r["keep_sha1"] else "no")
        pub = PUBLISHED.get((r["instance"], r["device"].split(":")[0]), {})
        total = f"{r['total_seconds']:.3f}" if r.get("local_search", True) else "(no LS)"
        if r.get("ls_timed_out"):
            total += " (LS stopped at the time limit)"
        dtype = r["dtype"] + (", low-memory" if r["low_memory"] else "")
        lines.append(
            f"| {r['instance']} | {r['d']} | {r['m']} | {r['machine_short']} | {r['device']} | {dtype} "
            f"| {r['greedy_seconds']:.3f} | {r['greedy_err']:.6f} | {total} | {r['err']:.6f} | {r['single_swaps']} "
            f"| {same} | {pub.get('greedy', '-')} | {pub.get('total', '-')} | {pub.get('err', '-')} | {r['peak_cpu_rss_gb']:.1f} "
            f"| {r.get('peak_cuda_gb', float('nan')):.1f} |")
    lines.append("")
    lines_of = {key: [r for r in rows if _series(r) == key and r["instance"] != "smollm2-l10-down"]
                for key in sorted({_series(r) for r in rows})}  # rows already sorted by d
    for key, syn in lines_of.items():
        if len(syn) >= 2:
            fit = _fit_rows(syn)
            k = growth_exponent([r["d"] for r in fit], [r["greedy_seconds"] for r in fit])
            mode = f"{key[2]}" + (", low-memory" if key[3] else "")
            lines.append(f"Greedy time on {key[0]} ({key[1]}, {mode}) grows as d^{k:.2f} over d = "
                         f"{fit[0]['d']}..{fit[-1]['d']}.")
    atomic_write(out / "speed.md", lambda fh: fh.write("\n".join(lines) + "\n"))
    atomic_write_json(out / "speed.json", {"rows": rows})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for key, syn in lines_of.items():
            if not syn:
                continue
            ds = [r["d"] for r in syn]
            secs = [r["greedy_seconds"] for r in syn]
            fit = _fit_rows(syn)
            label = f"{key[0]} {key[2]}" + (", low-memory" if key[3] else "") + " greedy"
            if len(fit) >= 2:
                label += f" (d^{growth_exponent([r['d'] for r in fit], [r['greedy_seconds'] for r in fit]):.2f}" \
                         f" over {fit[0]['d']}..{fit[-1]['d']})"
            ax.loglog(ds, secs, "o-", label=label)
        ax.set_xlabel("d (input rows)")
        ax.set_ylabel("seconds")
        ax.set_title("OSSCAR greedy time versus layer width")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        atomic_write(out / "speed.png", lambda fh: fig.savefig(fh, dpi=120, format="png"), binary=True)
        plt.close(fig)
    except ImportError:
        pass


__all__ = ["run", "synthetic", "time_instance", "growth_exponent"]
