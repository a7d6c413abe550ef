"""Speed and memory on a model's shapes, where its weights cannot go
(`osscar-opt bench-shaped`, or `python -m osscar_opt.benchmarks.shaped`).

Latency, pruning time and memory depend on a model's shapes, not on its
weight values. `make` writes a Hugging Face model folder with the
architecture of a model folder at hand (its config, with optional
overrides, and its tokenizer) and seeded random weights; the prune command
then prunes and times it like the real model:

    osscar-opt bench-shaped make --like MODEL_DIR --out /tmp/shaped
    osscar-opt prune --model /tmp/shaped --device cuda --out /tmp/shaped-pruned

Its perplexity means nothing (random weights); its parameter counts,
pruning seconds and dense-versus-pruned speed-ups are those of the real
shapes. `offload` prunes such a model on CUDA with the GPU memory capped
below the model's own size, which works because only the current block is
on the accelerator (apply's sequential mode):

    osscar-opt bench-shaped offload --model /tmp/shaped --cap-gb 1.0 --out results/offload.json

It prints and writes the model's size, the cap, the peak allocated GPU
memory and the seconds, then evaluates the pruned model's perplexity under
the same cap with its blocks offloaded (`placement.offloaded`, what
`prune --device cuda` does for a model larger than the GPU's free memory)
and adds that pass's peak and seconds. `latency` times a dense and a pruned folder in
alternation per dtype and batch size:

    osscar-opt bench-shaped latency --dense /tmp/shaped --pruned /tmp/shaped-pruned/model --out results/latency.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import OsscarError
from . import machine

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "tokenizer.model", "generation_config.json", "chat_template.jinja")


class ShapedError(OsscarError, ValueError):
    """Bad arguments of a shaped-model benchmark."""


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _first_line(exc: BaseException) -> str:
    """The gist of an exception on one line (a first line ending in ':' is joined to the next)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def parse_overrides(items: Sequence[str]) -> dict:
    """["hidden_size=960", ...] -> {"hidden_size": 960, ...} (values read as JSON where they parse)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ShapedError(f"--set {item!r}: write NAME=VALUE, e.g. --set hidden_size=960")
        out[key] = _value(value)
    return out


def make(like: str | Path, out: str | Path, overrides: dict | None = None, seed: int = 0) -> dict:
    """Write a model folder with the architecture of `like` (config.json plus
    `overrides`) and seeded random weights, with `like`'s tokenizer files;
    returns {"out", "parameters", "config"}."""
    import torch

    from ..io import writable_folder
    from ..errors import require

    transformers = require("transformers", "models", "building a model from its config")
    like, out = Path(like), Path(out)
    if not (like / "config.json").is_file():
        raise ShapedError(f"no config.json in {like}: give a Hugging Face model folder as --like")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ShapedError(f"{out} exists and is not an empty folder: give a new folder as --out")
    writable_folder(out.parent, "the folder of --out")
    config = transformers.AutoConfig.from_pretrained(like)
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ShapedError(f"--set {key}: {type(config).__name__} has no such field")
        try:  # transformers validates some fields as they are set
            setattr(config, key, value)
        except Exception as exc:
            raise ShapedError(f"--set {key}={value!r}: {_first_line(exc)}") from None
    for key in ("osscar_layer_sizes", "osscar_name"):  # a pruned folder as --like: its uniform sizes stand
        if hasattr(config, key):
            delattr(config, key)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ShapedError(f"{like}/config.json names no known architecture ({arch!r})")
    torch.manual_seed(seed)
    try:
        model = cls(config)
    except (ValueError, TypeError, RuntimeError) as exc:  # e.g. a negative or inconsistent size
        raise ShapedError(f"the config with these --set values builds no {arch}: {_first_line(exc)}") from None
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (like / name).is_file() and not (tmp / name).exists():
            shutil.copy2(like / name, tmp / name)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return {"out": str(out), "parameters": sum(p.numel() for p in model.parameters()),
            "config": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                       "num_attention_heads", "num_key_value_heads")
                       if hasattr(config, k)}}


def offload(model_dir: str | Path, cap_gb: float, sparsity: float = 0.5, nsamples: int = 32, seq_len: int = 512,
            device: str = "cuda") -> dict:
    """Prune the model in `model_dir` on `device` with the process's GPU memory
    capped at `cap_gb` (torch's caching allocator refuses more)."""
    import torch

    from .. import data, models
    from ..apply import apply
    from ..evaluation import evaluate_model
    from ..registry import device_problem

    problem = device_problem(device, use_cpu="a machine with a CUDA GPU")
    if problem or not device.startswith("cuda"):
        raise ShapedError(f"offload measures GPU memory: --device {device}: {problem or 'give cuda or cuda:N'}")
    dev = torch.device(device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    if not 0 < cap_gb * 2**30 < total:
        raise ShapedError(f"--cap-gb {cap_gb}: give a cap between 0 and the GPU's {total / 2**30:.1f} GB")
    model, tok = models.load(str(model_dir), dtype=torch.float32)
    size_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    cal = data.calibration(tok, "pydoc", nsamples, seq_len)
    torch.cuda.set_per_process_memory_fraction(cap_gb * 2**30 / total, dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    report = apply(model, cal, sparsity, device=dev, progress=False)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(dev) / 2**30
    # the pruned model's perplexity under the same cap, its blocks offloaded (random weights: only
    # the memory and time mean something)
    torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    evaluated = evaluate_model(model, tok, n_windows=8, seq_len=seq_len, device=dev, offload=True)
    eval_seconds = time.perf_counter() - start
    eval_peak = torch.cuda.max_memory_allocated(dev) / 2**30
    return {"model": str(model_dir), "model_gb": round(size_gb, 3), "cap_gb": cap_gb, "peak_gpu_gb": round(peak, 3),
            "eval_offloaded_peak_gpu_gb": round(eval_peak, 3), "eval_offloaded_seconds": round(eval_seconds, 2),
            "eval_perplexity_finite": math.isfinite(evaluated["perplexity"]),
            "seconds": round(seconds, 2), "solve_seconds": round(report.solve_seconds, 2),
            "params_before": report.params_before, "params_after": report.params_after,
            "sparsity": sparsity, "calibration": f"pydoc {nsamples} x {seq_len}",
            "on_device_after": sorted({p.device.type for p in model.parameters()}), "machine": machine()}


def latency(dense_dir: str | Path, pruned_dir: str | Path, batches: Sequence[int] = (1, 8, 32), seq_len: int = 512,
            device: str = "cuda", dtypes: Sequence[str] = ("float32", "bfloat16"), rounds: int = 5) -> list[dict]:
    """Prefill latency of two model folders (dense, pruned) measured in
    alternation (`evaluation.compare_latency`) per dtype and batch size, on
    seeded random token ids; greedy generation (32 tokens) at batch 1."""
    import torch

    from ..evaluation import compare_latency
    from ..registry import resolve_device
    from ..surgery import load_pruned

    device = resolve_device(device, ("cpu", "cuda"), what="latency")
    for flag, values in (("--batches", batches), ("--seq-len", [seq_len]), ("--rounds", [rounds])):
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ShapedError(f"{flag} takes positive integers, got {', '.join(map(str, values)) or 'none'}")
    rows = []
    for name in dtypes:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ShapedError(f"--dtypes {name}: give torch dtype names such as float32,bfloat16")
        # load_pruned reads per-layer sizes too; no tokenizer is needed for token ids
        dense = load_pruned(dense_dir, dtype=dtype).to(device)
        pruned = load_pruned(pruned_dir, dtype=dtype).to(device)
        vocab = min(dense.config.vocab_size, pruned.config.vocab_size)
        for b in batches:
            x = torch.randint(0, vocab, (b, seq_len), generator=torch.Generator().manual_seed(b))
            d, p = compare_latency(dense, pruned, x, new_tokens=32 if b == 1 else 0, rounds=rounds)
            row = {"dtype": name, "batch": b, "seq_len": seq_len, "device": device,
                   "dense_prefill_s": d["prefill_seconds"], "pruned_prefill_s": p["prefill_seconds"],
                   "prefill_speedup": d["prefill_seconds"] / p["prefill_seconds"]}
            if "generate_tokens_per_second" in d:
                row.update(dense_generate_tps=d["generate_tokens_per_second"],
                           pruned_generate_tps=p["generate_tokens_per_second"],
                           generate_speedup=p["generate_tokens_per_second"] / d["generate_tokens_per_second"])
            rows.append(row)
            gen = f", generation {row['generate_speedup']:.2f}x" if "generate_speedup" in row else ""
            print(f"{name:9s} batch {b:3d} x {seq_len}: prefill {row['dense_prefill_s'] * 1e3:8.2f} ms -> "
                  f"{row['pruned_prefill_s'] * 1e3:8.2f} ms ({row['prefill_speedup']:.2f}x){gen}", file=sys.stderr)
        del dense, pruned
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The make / offload / latency actions (shared by `osscar-opt bench-shaped` and `python -m`)."""
    sub = parser.add_subparsers(dest="action", required=True)
    mk = sub.add_parser("make", help="a model folder with another's architecture and random weights")
    mk.add_argument("--like", required=True, help="a Hugging Face model folder (its config and tokenizer)")
    mk.add_argument("--out", required=True, type=Path)
    mk.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a config override")
    mk.add_argument("--seed", type=int, default=0)
    off = sub.add_parser("offload", help="prune on CUDA with the GPU memory capped below the model's size")
    off.add_argument("--model", required=True, help="a model folder (e.g. one written by make)")
    off.add_argument("--cap-gb", type=float, required=True)
    off.add_argument("--sparsity", type=float, default=0.5)
    off.add_argument("--nsamples", type=int, default=32)
    off.add_argument("--seq-len", type=int, default=512)
    off.add_argument("--device", default="cuda")
    off.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    lat = sub.add_parser("latency", help="prefill (and batch-1 generation) latency of a dense and a pruned folder")
    lat.add_argument("--dense", required=True)
    lat.add_argument("--pruned", required=True)
    lat.add_argument("--batches", default="1,8,32")
    lat.add_argument("--seq-len", type=int, default=512)
    lat.add_argument("--dtypes", default="float32,bfloat16")
    lat.add_argument("--rounds", type=int, default=5)
    lat.add_argument("--device", default="cuda")
    lat.add_argument("--out", type=Path, default=None, help="write the rows here as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the parsed action; prints the figures as JSON (and writes them to --out). Raises OsscarError."""
    if args.action == "make":
        result = make(args.like, args.out, parse_overrides(args.set), seed=args.seed)
    elif args.action == "offload":
        result = offload(args.model, args.cap_gb, args.sparsity, args.nsamples, args.seq_len, args.device)
    else:
        try:
            batches = [int(b) for b in args.batches.split(",")]
        except ValueError:
            raise ShapedError(f"--batches {args.batches}: give comma-separated batch sizes, e.g. 1,8,32") from None
        result = {"rows": latency(args.dense, args.pruned, batches, args.seq_len, args.device,
                                  args.dtypes.split(","), args.rounds), "machine": machine()}
    print(json.dumps(result, indent=2))
    if args.action != "make" and args.out is not None:
        from ..io import atomic_write_json

        atomic_write_json(args.out, result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m osscar_opt.benchmarks.shaped", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except OsscarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
