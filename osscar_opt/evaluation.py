"""Model quality and speed: perplexity, embedding fidelity, accuracy, latency.

Perplexity is exp of the mean next-token loss over fixed windows of the
evaluation half of the text (never the calibration half). Encoders are
scored by the cosine similarity of their mean-pooled sentence embeddings to
the dense model's on held-out paragraphs. Latency is the median of repeated
timed runs after warm-up (CUDA synchronized).

A model larger than the GPU's free memory is evaluated with its blocks
offloaded (`placement.offloaded`).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Any, Sequence

import torch
from torch import nn

from . import data
from .data import DataError
from .extract import no_cache
from .placement import placed


CPU_BATCH_TOKENS = 1024  # tokens per forward batch on a CPU when scoring


def scoring_batch(seq_len: int, device: Any) -> int:
    """Windows per forward batch when scoring (windows of `seq_len` tokens on
    `device`): 8 on an accelerator; on a CPU as many as make 1024 tokens.
    Larger CPU batches are slower, not faster: SmolLM2's 40 x 512-token
    evaluation takes 18 s per 24 windows in batches of 2 and 33-39 s in
    batches of 8 on a 2-core Xeon (the 8 x 512 x 49152 logits alone are
    805 MB); at 128 tokens, batches of 8 are the fastest."""
    if torch.device(device).type != "cpu":
        return 8
    return max(1, CPU_BATCH_TOKENS // max(1, int(seq_len)))


def next_token_loss_sum(logits: torch.Tensor, ids: torch.Tensor,
                        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Sum of the next-token cross-entropies of (batch, seq_len) windows and
    how many there are (positions whose label is padding left out; half-
    precision logits scored in float32)."""
    labels = ids[:, 1:].clone()
    if mask is not None:
        labels[mask[:, 1:] == 0] = -100
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int | None = None, device: Any = None) -> float:
    """exp(mean next-token loss) over (n, seq_len) windows of token ids
    (`batch_size` windows at a time; default `scoring_batch`)."""
    dev = device or next(model.parameters()).device
    batch_size = batch_size or scoring_batch(windows.shape[1], dev)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for a in range(0, windows.shape[0], batch_size):
            x = windows[a : a + batch_size].to(dev)
            loss, n = next_token_loss_sum(model(input_ids=x, **no_cache(model)).logits, x)
            total += float(loss)
            count += n
    return math.exp(total / count)


def kl_divergence(reference: nn.Module, model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
                  device: Any = None) -> float:
    """Mean KL(reference || model) of the next-token distributions over the
    positions `perplexity` scores, on (n, seq_len) windows of token ids: how far
    `model` (a pruned copy) moved from `reference` (the dense model)."""
    dev = device or next(model.parameters()).device
    reference.eval()
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for a in range(0, windows.shape[0], batch_size):
            x = windows[a : a + batch_size].to(dev)
            p = torch.log_softmax(reference(input_ids=x, **no_cache(reference)).logits[:, :-1].float(), dim=-1)
            q = torch.log_softmax(model(input_ids=x, **no_cache(model)).logits[:, :-1].float(), dim=-1)
            total += float((p.exp() * (p - q)).sum())
            count += p.shape[0] * p.shape[1]
    return total / count


def sentence_embeddings(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 32,
                        max_length: int = 128, device: Any = None) -> torch.Tensor:
    """Mean-pooled, L2-normalized embeddings (the sentence-transformers recipe)."""
    dev = device or next(model.parameters()).device
    out = []
    with torch.no_grad():
        for a in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[a : a + batch_size]), padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt").to(dev)
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(out)


def held_out_paragraphs(source: str = "pydoc", n: int = 256, min_chars: int = 40) -> list[str]:
    """Paragraphs of the evaluation half, for encoder fidelity."""
    return data.paragraph_texts(source, "evaluation", n, min_chars)


def embedding_fidelity(dense: torch.Tensor, pruned: torch.Tensor) -> float:
    """Mean cosine similarity of matching (normalized) embeddings."""
    return float((dense * pruned).sum(1).mean())


def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
             device: Any = None) -> float:
    dev = device or next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for a in range(0, inputs.shape[0], batch_size):
            pred = model(inputs[a : a + batch_size].to(dev)).argmax(-1).cpu()
            correct += int((pred == labels[a : a + batch_size]).sum())
    return correct / inputs.shape[0]


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def latency(model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 0, warmup: int = 2, repeats: int = 5) -> dict:
    """Median seconds of a prefill (one forward over input_ids) and, for causal
    LMs with new_tokens > 0, tokens per second of greedy generation."""
    dev = next(model.parameters()).device
    x = input_ids.to(dev)
    model.eval()
    out = {"batch": int(x.shape[0]), "seq_len": int(x.shape[1])}
    with torch.no_grad():
        out["prefill_seconds"] = _timed(lambda: model(input_ids=x), dev, warmup, repeats)
        out["prefill_tokens_per_second"] = x.numel() / out["prefill_seconds"]
        if new_tokens > 0 and hasattr(model, "generate"):
            prompt = x[:1, : min(64, x.shape[1])]
            mask = torch.ones_like(prompt)

            def gen():
                model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)

            secs = _timed(gen, dev, 1, max(1, repeats // 2))
            out["generate_tokens_per_second"] = new_tokens / secs
    return out


def compare_latency(dense: nn.Module, pruned: nn.Module, input_ids: torch.Tensor, new_tokens: int = 32,
                    warmup: int = 2, rounds: int = 5) -> tuple[dict, dict]:
    """latency() of two models measured in alternation (dense, pruned, dense,
    ...), medians over the rounds, so that other load on the machine weighs
    on both alike; returns (dense, pruned)."""
    runs: tuple[list, list] = ([], [])
    for r in range(rounds):
        for i, model in enumerate((dense, pruned)):
            runs[i].append(latency(model, input_ids, new_tokens=new_tokens if r < max(1, rounds // 2 + 1) else 0,
                                   warmup=warmup if r == 0 else 0, repeats=1))
    out = []
    for rows in runs:
        merged = dict(rows[0])
        for key in ("prefill_seconds", "prefill_tokens_per_second", "generate_tokens_per_second"):
            vals = [row[key] for row in rows if key in row]
            if vals:
                merged[key] = statistics.median(vals)
        merged["rounds"] = rounds
        out.append(merged)
    return out[0], out[1]


def evaluate_model(model: nn.Module, tokenizer: Any = None, kind: str | None = None, source: str = "pydoc",
                   n_windows: int = 40, seq_len: int = 512, reference: torch.Tensor | None = None,
                   inputs: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                   speed: bool = False, device: Any = None, offload: bool | None = None) -> dict:
    """Quality (and optionally speed) of a model.

    device: where to run it (default: where it is). The model moves there
    whole and stays, unless it does not fit in the free memory of a CUDA
    device (or offload=True): then it runs with its blocks offloaded
    (`placement.offloaded`), stays where it was, and its latency is not measured
    (`speed_skipped` says so). offload=False always moves it whole.

    kind: "causal-lm" (perplexity on the evaluation half), "encoder" (cosine
    fidelity of embeddings to `reference`, the dense model's embeddings of the
    same held-out paragraphs) or "classifier" (accuracy on inputs/labels).
    """
    from .apply import count_parameters

    if kind is None:
        kind = "classifier" if inputs is not None else (
            "causal-lm" if hasattr(model, "generate") and hasattr(model, "lm_head") else "encoder")
    if kind not in ("causal-lm", "encoder", "classifier"):
        raise DataError(f"unknown model kind {kind!r}: use causal-lm, encoder or classifier")
    if kind == "classifier" and (inputs is None or labels is None):
        raise DataError("a classifier is evaluated on inputs= and labels= (its accuracy): pass both")
    if kind != "classifier" and tokenizer is None:
        raise DataError(f"evaluating a {kind} model needs its tokenizer (models.load returns the pair): "
                        "evaluate_model(model, tokenizer)")
    result: dict[str, Any] = {"kind": kind, "parameters": count_parameters(model)}
    placement: Any = contextlib.nullcontext()
    dev = next(model.parameters()).device
    whole = True
    if device is not None:
        from .registry import resolve_device

        dev = torch.device(resolve_device(device, ("cpu", "cuda"), what="evaluate_model"))
        whole, placement = placed(model, dev, offload)
    result["offloaded"] = not whole
    if speed and result["offloaded"]:
        result["speed_skipped"] = f"run block by block on {dev}: latency is measured only with the whole model there"
        speed = False
    with placement:
        if kind == "causal-lm":
            windows = data.windows(tokenizer, source, "evaluation", n_windows, seq_len)
            result["perplexity"] = perplexity(model, windows, device=dev)
            result["eval_tokens"] = int(windows.numel())
            if speed:
                result["speed"] = latency(model, windows[:1, :seq_len], new_tokens=32)
        elif kind == "encoder":
            texts = held_out_paragraphs(source)
            emb = sentence_embeddings(model, tokenizer, texts, device=dev)
            result["embeddings"] = emb
            result["sentences"] = len(texts)
            if reference is not None:
                result["fidelity"] = embedding_fidelity(reference, emb)
            if speed:
                enc = tokenizer(texts[:32], padding="max_length", truncation=True, max_length=128,
                                return_tensors="pt")
                result["speed"] = {"prefill_seconds": _timed(lambda: model(**enc.to(dev)), dev, 2, 5), "batch": 32,
                                   "seq_len": 128}
        else:
            result["accuracy"] = accuracy(model, inputs, labels, device=dev)
    return result


def relative_speedup(dense: dict, pruned: dict) -> float:
    return dense["prefill_seconds"] / pruned["prefill_seconds"]


__all__ = ["perplexity", "sentence_embeddings", "embedding_fidelity", "accuracy", "latency", "evaluate_model",
           "held_out_paragraphs", "relative_speedup"]
