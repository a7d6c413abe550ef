"""Benchmark scripts: each prints its figures and writes them under results/."""

from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "results"


def machine() -> dict:
    """A short description of the machine a figure was measured on."""
    import os
    import platform

    import torch

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict | None = None) -> str:
    info = info or machine()
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return f"{info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads){gpu}, torch {info['torch']}"
