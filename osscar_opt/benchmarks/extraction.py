"""Extraction speed and memory: `osscar-opt bench-extract`.

Extracts the heads and neurons instances of every SmolLM2-135M layer from the
pydoc calibration half (64 x 512 tokens by default) and reports the wall time
and the peak memory. Each configuration runs in its own process so that the
peak resident memory is that configuration's; running with several numbers
of windows shows that the peak does not grow with the number of tokens (the
Gram matrices are accumulated batch by batch). Writes results/extract.md and
results/extract.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from ..io import writable_folder
from . import RESULTS, machine, machine_line


def one(windows: int, seq_len: int, device: str | None, batch_size: int) -> dict:
    """Run in a fresh process: load, extract everything, measure."""
    import resource
    import time

    import torch

    from .. import data, models
    from ..extract import extract

    t0 = time.perf_counter()
    model, tok = models.load("smollm2-135m", dtype=torch.float32)
    load_seconds = time.perf_counter() - t0
    cal = data.calibration(tok, "pydoc", windows, seq_len)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device and device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    insts = extract(model, cal, structures=("heads", "neurons"), device=device, batch_size=batch_size,
                    progress=False, model_name="smollm2-135m")
    if device and device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t1
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    grams = sum(i.d * i.d * 8 for i in insts[::1]) / 2**30  # float64 Gram per consumer (heads and neurons)
    out = {"windows": windows, "seq_len": seq_len, "tokens": windows * seq_len, "device": device or "cpu",
           "instances": len(insts), "seconds": seconds, "load_seconds": load_seconds,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "rss_after_load_gb": rss_before, "model_gb": params, "grams_gb": grams}
    if device and device.startswith("cuda"):
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run(windows: Sequence[int] = (16, 64), seq_len: int = 512, devices: Sequence[str] | None = None,
        batch_size: int = 8, out: str | Path | None = None) -> list[dict]:
    import torch

    out = writable_folder(Path(out) if out else RESULTS)  # before minutes of extraction, not after
    devices = list(devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]))
    rows = []
    for device in devices:
        for w in windows:
            cmd = [sys.executable, "-m", "osscar_opt.benchmarks.extraction", str(w), str(seq_len), device, str(batch_size)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"extraction benchmark failed: {res.stderr.strip().splitlines()[-1]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{device}: {w} x {seq_len} tokens, {row['instances']} instances in {row['seconds']:.1f} s; "
                  f"peak RSS {row['peak_rss_gb']:.2f} GB (model {row['model_gb']:.2f} GB, Grams {row['grams_gb']:.2f} GB)"
                  + (f", peak CUDA {row['peak_cuda_gb']:.2f} GB" if "peak_cuda_gb" in row else ""))
    lines = ["# Extraction speed and memory (SmolLM2-135M, every layer's heads and neurons)", "",
             f"Machine: {machine_line(machine())}. Command: `osscar-opt bench-extract`.", "",
             "| device | windows x seq_len | tokens | instances | seconds | peak RSS GB | model GB | Grams GB | peak CUDA GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['windows']} x {r['seq_len']} | {r['tokens']} | {r['instances']} | {r['seconds']:.1f} "
                     f"| {r['peak_rss_gb']:.2f} | {r['model_gb']:.2f} | {r['grams_gb']:.2f} | {r.get('peak_cuda_gb', float('nan')):.2f} |")
    (out / "extract.md").write_text("\n".join(lines) + "\n")
    (out / "extract.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    w, s, dev, b = sys.argv[1:5]
    print(json.dumps(one(int(w), int(s), None if dev == "cpu" else dev, int(b))))
