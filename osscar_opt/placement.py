"""Where a model runs: whole on a device, or block by block when it does not fit.

`offloaded(model, device)` runs a model on an accelerator holding one
transformer block there at a time: the embeddings, rotary tables, final norm
and head go to the device, each block moves there just before its forward
and back just after. `placed` chooses between that and moving the model
whole (`fits_on`); `evaluate_model`, `extract` and `apply` (dense
activations) use it.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import torch
from torch import nn


def model_bytes(model: nn.Module, unless_on: torch.device | None = None) -> int:
    """Bytes of the model's parameters and buffers (tied tensors counted once),
    leaving out those already on `unless_on`."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers())
               if t.device != unless_on)


def fits_on(model: nn.Module, device: Any, fraction: float = 0.8) -> bool:
    """Whether the model's tensors not yet on a CUDA `device` fit in `fraction`
    of the memory this process may still take there (the device's free memory
    and torch's cached blocks, within a per-process memory fraction); the rest
    is left for activations. Always True off CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return True
    there = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(there)
    held = torch.cuda.memory_allocated(there)
    free += torch.cuda.memory_reserved(there) - held  # cached by torch, free for new tensors
    cap = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # set_per_process_memory_fraction
    if cap is not None:
        free = min(free, cap(there) * total - held)
    return model_bytes(model, unless_on=there) <= fraction * free


def placed(model: nn.Module, device: Any, offload: bool | None = None) -> tuple[bool, Any]:
    """(whole, context) for running `model` on `device`: whole (offload=False,
    or None and it fits) moves it there now and the context does nothing;
    otherwise the context runs it `offloaded`."""
    whole = fits_on(model, device) if offload is None else not offload
    if whole:
        model.to(device)
        return True, contextlib.nullcontext()
    return False, offloaded(model, device)


@contextlib.contextmanager
def offloaded(model: nn.Module, device: Any):
    """Run `model` on `device` holding only one transformer block there at a time.

    Everything outside the blocks (embeddings, rotary tables, final norm, head)
    moves to `device` for the duration; every block moves there just before
    its forward and back just after. On exit, also after an error, every
    tensor is back where it was and the hooks are gone. Models without
    transformer blocks (CNNs) are moved whole.
    """
    from .adapters import ConvAdapter, adapter_for

    dev = torch.device(device)
    adapter = adapter_for(model)
    if isinstance(adapter, ConvAdapter):
        home = next(model.parameters()).device
        model.to(dev)
        try:
            yield model
        finally:
            model.to(home)
        return
    blocks = [adapter.block(i) for i in range(adapter.n_layers)]
    inside = {id(m) for b in blocks for m in b.modules()}
    outside = [m for m in model.modules() if id(m) not in inside]
    param_homes: dict[int, tuple[nn.Parameter, torch.device]] = {}
    buffer_homes: list[tuple[nn.Module, str, torch.device]] = []
    block_homes = [next(itertools.chain(b.parameters(), b.buffers())).device for b in blocks]
    handles = []

    def to_device(module, args):
        module.to(dev)

    def back_home(home):
        def hook(module, args, output):
            module.to(home)
        return hook

    try:
        for m in outside:
            for p in m.parameters(recurse=False):
                if id(p) not in param_homes:
                    param_homes[id(p)] = (p, p.device)
                    p.data = p.data.to(dev)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    buffer_homes.append((m, name, b.device))
                    m._buffers[name] = b.to(dev)
        for block, home in zip(blocks, block_homes):
            handles.append(block.register_forward_pre_hook(to_device))
            handles.append(block.register_forward_hook(back_home(home)))
        yield model
    finally:
        for h in handles:
            h.remove()
        for block, home in zip(blocks, block_homes):
            block.to(home)
        for p, home in param_homes.values():
            p.data = p.data.to(home)
        for m, name, home in buffer_homes:
            if m._buffers.get(name) is not None:
                m._buffers[name] = m._buffers[name].to(home)


__all__ = ["offloaded", "placed", "fits_on", "model_bytes"]
