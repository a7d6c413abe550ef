"""Model surgery: physically remove pruned groups, rewrite the config, save and load.

After a site is solved (a sorted array `keep` of group ids and refit weights
W, d x m, zero outside the kept rows), `remove_groups` shrinks the model:

- the consumer loses the input rows of the removed groups (Linear columns,
  Conv1D rows, Conv2d input channels); its weight becomes W restricted to the
  kept rows when W is given, else the original kept rows; its bias stays;
- the producers of those rows lose the matching outputs (q_proj rows of a
  removed head, gate/up rows of a removed neuron, the output channel of the
  producing conv and the BatchNorm in between), since nothing reads them any
  more;
- the attention module's head-count attributes are updated so that forward
  reshapes to the new number of heads;
- Llama `query-heads` (query heads kept freely): where KV groups keep
  different numbers c_j of query heads, k_proj/v_proj outputs are repeated
  so that KV head j appears c_j / g times (g = gcd of the c_j) and every
  copy serves g consecutive query heads: a valid GQA layer with
  num_key_value_heads = sum c_j / g, which may exceed the original count
  (`load_pruned` grows those layers to match);
- stacked MoE experts (gate_up_proj (experts, 2n, h), down_proj (experts,
  h, n); gpt-oss's transposed, interleaved, biased layout likewise) lose
  the gate and up rows (and biases) and the down_proj columns of each
  expert's removed neurons; every expert keeps the same number;
- attention sinks (gpt-oss: one logit per query head) go with their heads;
- Phi-3's fused projections lose the matching rows of each part (qkv_proj:
  query, key and value heads; gate_up_proj: gate and up neurons), and its
  attention, which reads the head count from the config, gets a
  `LayerConfig` with the layer's own count.

The pruned model computes exactly what the dense model computes with the
removed groups' consumer input rows zeroed (and with the consumer weight
replaced by W when W is given).

Two registries, both extendable (the Torch-Pruning pattern):

- `PRUNERS`, keyed by module type: how one module keeps a subset of its
  output or input channels (`Linear`, transformers' `Conv1D`, `Conv2d`,
  `BatchNorm1d/2d`, transformers' stacked MoE experts);
  `register_pruner(MyModule, MyPruner())` adds one;
- `SURGEONS`, keyed by adapter name: which modules of a block produce and
  consume a site's groups, the per-layer sizes and the config fields that
  describe them; `register_surgeon` adds one.

Every input is validated before anything is mutated: on any error the model
is left exactly as it was.

Config: after surgery `config.osscar_layer_sizes` lists every layer's sizes
(heads, kv_heads, neurons). Sizes that are the same in every layer and that
the standard config can express are also written to the standard fields
(`num_attention_heads`/`num_key_value_heads`/`head_dim`/`intermediate_size`
for Llama, `intermediate_size` for Phi-3, BERT and GPT-NeoX, `ffn_dim` for
OPT, `n_inner` for GPT-2, the experts' `moe_intermediate_size` (Mixtral,
OLMoE: `intermediate_size`) and `shared_expert_intermediate_size` for MoE
models) unless the config class's own validation rejects
them (LlamaConfig wants hidden_size % num_attention_heads == 0) or a model
built from them on the meta device would not match the pruned shapes better
(StableLM ignores a written head_dim); then `save_pretrained` +
`from_pretrained` reloads the model. Phi-3, BERT, OPT, GPT-2, GPT-NeoX and
StableLM derive the head size from hidden_size / num_attention_heads, so
a head-pruned model of those families (and any model whose layers differ)
cannot be described by the standard fields: they keep sizes at least as large
as every layer, `config.osscar_note` says so, and plain `from_pretrained`
raises transformers' size-mismatch RuntimeError listing the pruned weights
(with `ignore_mismatched_sizes=True` it would silently re-initialize them:
don't). `load_pruned` builds the model from the config, shrinks each layer to
its recorded sizes with the same `remove_groups`, then loads the weights.
(transformers 5 has a config-level `per_layer_config`, but in 5.24 the Llama,
BERT, OPT and GPT-2 modeling code does not read it, so it cannot be used.)
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .adapters import (EXPERT_MULTIPLE, Adapter, Site, adapter_for, experts_layout, head_norm_problem, is_conv1d,
                       is_experts, set_weight_matrix, text_config, weight_matrix)
from .errors import OsscarError, require


class SurgeryError(OsscarError, ValueError):
    """A removal or a save/load of a pruned model cannot be done as asked."""


# ------------------------------------------------------------ module pruners
class ModulePruner:
    """Keeps a subset of one module's output or input channels, in place.

    `index` is a sorted LongTensor of the channels kept, in the module's own
    units (features for Linear/Conv1D, channels for Conv2d); unique, except
    that Llama `query-heads` repeats the k/v outputs of a duplicated KV head.
    Parameters are replaced by new ones (old gradients are dropped).
    """

    def n_outputs(self, module: nn.Module) -> int:
        raise NotImplementedError

    def n_inputs(self, module: nn.Module) -> int:
        raise NotImplementedError

    def keep_outputs(self, module: nn.Module, index: torch.Tensor) -> None:
        raise NotImplementedError

    def keep_inputs(self, module: nn.Module, index: torch.Tensor) -> None:
        raise NotImplementedError


def _select(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    return tensor.detach().index_select(dim, index.to(tensor.device)).contiguous()


def _set_param(module: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    old = getattr(module, name)
    if old is None:
        return
    setattr(module, name, nn.Parameter(_select(old, dim, index), requires_grad=old.requires_grad))


class LinearPruner(ModulePruner):
    """nn.Linear: weight (out, in); outputs are weight rows and bias entries."""

    def n_outputs(self, module):
        return module.out_features

    def n_inputs(self, module):
        return module.in_features

    def keep_outputs(self, module, index):
        _set_param(module, "weight", 0, index)
        _set_param(module, "bias", 0, index)
        module.out_features = int(index.numel())

    def keep_inputs(self, module, index):
        _set_param(module, "weight", 1, index)
        module.in_features = int(index.numel())


class Conv1DPruner(ModulePruner):
    """transformers' Conv1D (GPT-2): weight stored (in, out), `nf` outputs."""

    def n_outputs(self, module):
        return int(module.nf)

    def n_inputs(self, module):
        return int(module.weight.shape[0])

    def keep_outputs(self, module, index):
        _set_param(module, "weight", 1, index)
        _set_param(module, "bias", 0, index)
        module.nf = int(index.numel())

    def keep_inputs(self, module, index):
        _set_param(module, "weight", 0, index)
        if hasattr(module, "nx"):
            module.nx = int(index.numel())


class Conv2dPruner(ModulePruner):
    """nn.Conv2d with groups=1: weight (out, in, kh, kw)."""

    def n_outputs(self, module):
        return module.out_channels

    def n_inputs(self, module):
        return module.in_channels

    def keep_outputs(self, module, index):
        _set_param(module, "weight", 0, index)
        _set_param(module, "bias", 0, index)
        module.out_channels = int(index.numel())

    def keep_inputs(self, module, index):
        _set_param(module, "weight", 1, index)
        module.in_channels = int(index.numel())


class BatchNormPruner(ModulePruner):
    """BatchNorm1d/2d: weight, bias, running_mean, running_var per channel."""

    def n_outputs(self, module):
        return module.num_features

    n_inputs = n_outputs

    def keep_outputs(self, module, index):
        _set_param(module, "weight", 0, index)
        _set_param(module, "bias", 0, index)
        for name in ("running_mean", "running_var"):
            buf = getattr(module, name, None)
            if buf is not None:
                setattr(module, name, _select(buf, 0, index))
        module.num_features = int(index.numel())

    keep_inputs = keep_outputs


class ExpertsPruner(ModulePruner):
    """Stacked MoE experts (`adapters.is_experts`, stored as
    `adapters.experts_layout` says: gate_up_proj (E, 2n, h) gate half first
    and down_proj (E, h, n), or gpt-oss's transposed, interleaved, biased
    weights). Outputs and inputs are the experts' neurons, expert e's at
    e x n .. (e + 1) x n - 1; every expert must keep the same number (one
    stacked tensor). down_proj's bias stays."""

    def n_outputs(self, module):
        layout = experts_layout(module)
        return layout.experts * layout.neurons

    n_inputs = n_outputs

    @staticmethod
    def _per_expert(module, index):
        layout = experts_layout(module)
        expert = index // layout.neurons
        counts = torch.bincount(expert, minlength=layout.experts)
        if index.numel() % layout.experts or torch.any(counts != counts[0]):
            raise SurgeryError(f"kept neurons per expert are {counts.tolist()}: stacked experts must keep the "
                               "same number in every expert")
        return (index - expert * layout.neurons).reshape(layout.experts, -1)

    @staticmethod
    def _select(module, name, index, dim):
        """Parameter `name` with expert e keeping entries index[e] along `dim` (of the per-expert slice)."""
        old = getattr(module, name)
        index = index.to(old.device)
        new = torch.stack([old.detach()[e].index_select(dim, index[e]) for e in range(index.shape[0])])
        setattr(module, name, nn.Parameter(new.contiguous(), requires_grad=old.requires_grad))

    def keep_outputs(self, module, index):
        layout = experts_layout(module)
        idx = self._per_expert(module, index)
        rows = layout.gate_up_index(idx)
        self._select(module, "gate_up_proj", rows, 1 if layout.transposed else 0)
        if layout.bias:
            self._select(module, "gate_up_proj_bias", rows, 0)
        for attr in ("intermediate_dim", "intermediate_size"):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, int(idx.shape[1]))

    def keep_inputs(self, module, index):
        layout = experts_layout(module)
        self._select(module, "down_proj", self._per_expert(module, index), 0 if layout.transposed else 1)


PRUNERS: dict[type, ModulePruner] = {
    nn.Linear: LinearPruner(),
    nn.Conv2d: Conv2dPruner(),
    nn.BatchNorm1d: BatchNormPruner(),
    nn.BatchNorm2d: BatchNormPruner(),
}


def register_pruner(module_type: type, pruner: ModulePruner) -> None:
    """Teach the surgery how to shrink another module type (subclasses included)."""
    PRUNERS[module_type] = pruner


def pruner_for(module: nn.Module) -> ModulePruner:
    for cls in type(module).__mro__:
        if cls in PRUNERS:
            return PRUNERS[cls]
    if is_conv1d(module):  # transformers' Conv1D, registered on first sight (no import at load)
        PRUNERS[type(module)] = Conv1DPruner()
        return PRUNERS[type(module)]
    if is_experts(module):  # transformers' stacked MoE experts (one class per model type)
        PRUNERS[type(module)] = ExpertsPruner()
        return PRUNERS[type(module)]
    raise SurgeryError(f"no pruner for {type(module).__name__}: register one with "
                       "osscar_opt.surgery.register_pruner(ModuleType, ModulePruner())")


# --------------------------------------------------------------------- plans
@dataclass
class _Op:
    path: str
    side: str  # "outputs" or "inputs"
    index: np.ndarray  # kept channels in the module's own units
    param: str | None = None  # set: entries `index` of this 1-D parameter of the module (gpt-oss's sinks) stay


@dataclass
class Plan:
    """Everything one removal changes, computed and checked before mutation."""

    consumer: str
    rows: np.ndarray  # kept rows of the consumer's weight matrix (refit weights)
    ops: list[_Op] = field(default_factory=list)
    attrs: list[tuple[str, str, Any]] = field(default_factory=list)  # (module path, attribute, value)


def _rows(groups: np.ndarray, size: int) -> np.ndarray:
    """Feature rows of `groups` of `size` consecutive rows each."""
    return (np.asarray(groups, dtype=np.int64)[:, None] * size + np.arange(size)).ravel()


def _set_attr_if_present(plan: Plan, model: nn.Module, path: str, names: tuple[str, ...], value: int) -> None:
    module = model.get_submodule(path)
    for name in names:
        if hasattr(module, name):
            plan.attrs.append((path, name, int(value)))


# ------------------------------------------------------------------ surgeons
class Surgeon:
    """Architecture part of the surgery for one adapter family.

    `plan` lists the modules that lose outputs/inputs for a site, `layer_sizes`
    reads a layer's current sizes from its modules, `standard_sizes` gives the
    sizes that the standard config fields imply, `uniform_fields` the
    standard fields to write when sizes agree across layers, and `shrink_to`
    reduces a freshly built layer to recorded sizes (used by `load_pruned`).
    """

    name: ClassVar[str] = ""
    shrink_keys: ClassVar[tuple[tuple[str, str], ...]] = ()  # (structure, size key) for the default shrink_to
    growable: ClassVar[tuple[str, ...]] = ()  # size keys a pruned layer may have above the standard ones

    def plan(self, model: nn.Module, adapter: Adapter, site: Site, keep: np.ndarray) -> Plan:
        raise NotImplementedError

    def layer_sizes(self, model: nn.Module, adapter: Adapter, layer: int) -> dict[str, int]:
        raise NotImplementedError

    def standard_sizes(self, config: Any) -> dict[str, int] | None:
        return None

    def uniform_fields(self, model: nn.Module, adapter: Adapter, sizes: dict[str, int],
                       uniform: set[str]) -> list[dict[str, int]]:
        """Groups of standard config fields to write, given the sizes that agree
        in every layer; a group the config's own validation rejects is skipped."""
        return []

    def shrink_to(self, model: nn.Module, adapter: Adapter, layer: int, sizes: dict[str, int]) -> None:
        current = self.layer_sizes(model, adapter, layer)
        for structure, key in self.shrink_keys:
            target = int(sizes[key])
            if target < current[key]:
                _remove(model, adapter, adapter.site(structure, layer), np.arange(target), None)


def kv_copies(keep: np.ndarray, rep: int) -> np.ndarray:
    """The KV head of each KV copy after keeping query heads `keep` (sorted)
    of a GQA layer with `rep` query heads per KV head. KV group j keeps c_j
    heads; with g = gcd of the nonzero c_j, it gets c_j / g copies of its KV
    head, each serving g consecutive query heads (equal c_j: one copy each,
    nothing duplicated)."""
    counts = np.bincount(np.asarray(keep) // rep)
    g = int(np.gcd.reduce(counts[counts > 0]))
    return np.repeat(np.arange(counts.size), counts // g)


def _attention_plan(model: nn.Module, attn_path: str, q_heads: np.ndarray, kv_heads: np.ndarray, hd: int,
                    out: str = "o_proj") -> Plan:
    """Keep query heads `q_heads` (q_proj outputs, `out` inputs) and KV heads
    `kv_heads` (k_proj/v_proj outputs, repeats allowed) of a Llama attention;
    every KV head serves len(q_heads) / len(kv_heads) consecutive query heads."""
    q_rows, kv_rows = _rows(q_heads, hd), _rows(kv_heads, hd)
    plan = Plan(f"{attn_path}.{out}", q_rows, [_Op(f"{attn_path}.q_proj", "outputs", q_rows),
                                               _Op(f"{attn_path}.k_proj", "outputs", kv_rows),
                                               _Op(f"{attn_path}.v_proj", "outputs", kv_rows),
                                               _Op(f"{attn_path}.{out}", "inputs", q_rows)])
    sinks = getattr(model.get_submodule(attn_path), "sinks", None)
    if isinstance(sinks, nn.Parameter) and sinks.dim() == 1:  # gpt-oss: one attention-sink logit per query head
        plan.ops.append(_Op(attn_path, "outputs", np.asarray(q_heads, dtype=np.int64), "sinks"))
    _set_attr_if_present(plan, model, attn_path, ("num_key_value_groups",), len(q_heads) // len(kv_heads))
    _set_attr_if_present(plan, model, attn_path, ("num_heads",), len(q_heads))
    _set_attr_if_present(plan, model, attn_path, ("num_key_value_heads",), len(kv_heads))
    return plan


def _check_head_norms(model: nn.Module, attn_path: str, hd: int) -> None:
    """Refuse head removal where the query/key norms would have to change with it (`adapters.head_norm_problem`)."""
    problem = head_norm_problem(model.get_submodule(attn_path), hd)
    if problem:
        raise SurgeryError(f"{attn_path}.{problem}: removing heads is not supported for this model; prune "
                           "neurons only (structures=['neurons'])")


class LlamaSurgeon(Surgeon):
    """The llama adapter's families (and StarCoder2, Phi with their module
    names): heads (q_proj rows, GQA-balanced), kv-groups (q rows of the
    group's query heads + k/v rows of its kv head), neurons (gate_proj/up_proj
    rows, down_proj columns)."""

    name = "llama"
    growable = ("kv_heads",)  # query-heads duplicates KV heads

    def attention_plan(self, model, adapter, attn_path, q_heads, kv_heads, hd) -> Plan:
        """Keep query heads `q_heads` and KV heads `kv_heads` (repeats allowed)."""
        return _attention_plan(model, attn_path, q_heads, kv_heads, hd, adapter.out_proj)

    def ffn_ops(self, model, adapter, mlp, keep) -> list[_Op]:
        """The producers' outputs that feed the kept neurons."""
        return [_Op(f"{mlp}.{name}", "outputs", keep) for name in adapter.ffn_in]

    def ffn_plan(self, model, adapter, mlp, consumer, keep) -> Plan:
        """Keep neurons `keep` of the FFN at `mlp` whose output projection is `consumer`."""
        plan = Plan(consumer, keep, self.ffn_ops(model, adapter, mlp, keep) + [_Op(consumer, "inputs", keep)])
        _set_attr_if_present(plan, model, mlp, ("intermediate_size",), keep.size)
        return plan

    def plan(self, model, adapter, site, keep):
        prefix = adapter.block_name(site.layer)
        if site.structure == "neurons":
            return self.ffn_plan(model, adapter, f"{prefix}.mlp", site.consumer, keep)
        attn_path = f"{prefix}.self_attn"
        hd = int(model.get_submodule(attn_path).head_dim)
        _check_head_norms(model, attn_path, hd)
        n_kv = adapter.kv_heads(site.layer)
        rep = adapter.site("heads", site.layer).n_groups // n_kv
        if site.structure == "heads":  # the same KV heads, fewer query heads in each group
            return self.attention_plan(model, adapter, attn_path, keep, np.arange(n_kv), hd)
        if site.structure == "query-heads":
            # sorted keep: the query heads of one KV group are consecutive, like the copies of its KV head
            return self.attention_plan(model, adapter, attn_path, keep, kv_copies(keep, rep), hd)
        # kv-groups: group g = kv head g and query heads g*rep .. g*rep+rep-1
        return self.attention_plan(model, adapter, attn_path, (keep[:, None] * rep + np.arange(rep)).ravel(), keep,
                                   hd)

    def layer_sizes(self, model, adapter, layer):
        block = adapter.block(layer)
        return {"heads": getattr(block.self_attn, adapter.out_proj).in_features // adapter.head_dim(layer),
                "kv_heads": adapter.kv_heads(layer),
                "neurons": getattr(block.mlp, adapter.ffn_out).in_features}

    def standard_sizes(self, config):
        return {"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                "neurons": config.intermediate_size}

    def uniform_fields(self, model, adapter, sizes, uniform):
        out = []
        if {"heads", "kv_heads"} <= uniform:
            # head_dim made explicit: the default hidden_size // heads would change with the head count.
            # LlamaConfig also insists on hidden_size % num_attention_heads == 0 (checked by the caller).
            out.append({"num_attention_heads": sizes["heads"], "num_key_value_heads": sizes["kv_heads"],
                        "head_dim": int(adapter.block(0).self_attn.head_dim)})
        if "neurons" in uniform:
            out.append({"intermediate_size": sizes["neurons"]})
        return out

    def shrink_to(self, model, adapter, layer, sizes):
        self.shrink_attention(model, adapter, layer, sizes)
        if sizes["neurons"] < self.layer_sizes(model, adapter, layer)["neurons"]:
            _remove(model, adapter, adapter.site("neurons", layer), np.arange(sizes["neurons"]), None)

    def shrink_attention(self, model, adapter, layer, sizes):
        """Heads and KV heads of a freshly built layer to `sizes` (KV heads may grow: query-heads)."""
        cur = self.layer_sizes(model, adapter, layer)
        if sizes["kv_heads"] > cur["kv_heads"]:
            # duplicated KV heads (query-heads): only the shapes matter, the weights are loaded next
            attn_path = f"{adapter.block_name(layer)}.self_attn"
            plan = self.attention_plan(model, adapter, attn_path, np.arange(sizes["heads"]) % cur["heads"],
                                       np.arange(sizes["kv_heads"]) % cur["kv_heads"], adapter.head_dim(layer))
            _execute(model, plan, None)
            cur = self.layer_sizes(model, adapter, layer)
        if sizes["kv_heads"] < cur["kv_heads"]:
            _remove(model, adapter, adapter.site("kv-groups", layer), np.arange(sizes["kv_heads"]), None)
            cur = self.layer_sizes(model, adapter, layer)
        rep, target_rep = cur["heads"] // cur["kv_heads"], sizes["heads"] // sizes["kv_heads"]
        if target_rep < rep:
            keep = (np.arange(cur["kv_heads"])[:, None] * rep + np.arange(target_rep)).ravel()
            _remove(model, adapter, adapter.site("heads", layer), keep, None)


class LayerConfig:
    """One layer's view of a shared model config: `overrides` (e.g. this
    layer's num_attention_heads), everything else read from and written to
    `base`. Given to attention modules whose forward reads the head count from
    the config (Phi-3 splits its fused qkv_proj at config.num_attention_heads
    x head_dim), so that layers may keep different numbers of heads."""

    def __init__(self, base: Any, **overrides: Any):
        object.__setattr__(self, "_base", base.base if isinstance(base, LayerConfig) else base)
        previous = base.overrides if isinstance(base, LayerConfig) else {}
        object.__setattr__(self, "overrides", {**previous, **overrides})

    @property
    def base(self) -> Any:
        return self._base

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_base", "overrides"):  # copy/pickle probe before __init__
            raise AttributeError(name)
        overrides = self.__dict__["overrides"]
        return overrides[name] if name in overrides else getattr(self.__dict__["_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__["overrides"]:
            raise AttributeError(f"{name} is this layer's own value in a LayerConfig: it follows the layer's "
                                 "modules and cannot be set")
        setattr(self.__dict__["_base"], name, value)  # like a write to the shared config it stands for

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


class Phi3Surgeon(LlamaSurgeon):
    """Phi-3: the Llama structures on fused projections (qkv_proj rows: the
    query heads, then the KV heads' k rows, then their v rows; gate_up_proj
    rows: the gate half, then the up half). The attention module gets a
    `LayerConfig` with its own num_attention_heads."""

    name = "phi3"

    def attention_plan(self, model, adapter, attn_path, q_heads, kv_heads, hd):
        attn = model.get_submodule(attn_path)
        n_heads = attn.o_proj.in_features // hd
        n_kv = int(attn.num_key_value_heads)
        q_rows = _rows(q_heads, hd)
        kv_rows = _rows(kv_heads, hd)
        fused = np.concatenate([q_rows, n_heads * hd + kv_rows, (n_heads + n_kv) * hd + kv_rows])
        plan = Plan(f"{attn_path}.o_proj", q_rows, [_Op(f"{attn_path}.qkv_proj", "outputs", fused),
                                                    _Op(f"{attn_path}.o_proj", "inputs", q_rows)])
        plan.attrs += [(attn_path, "num_key_value_groups", len(q_heads) // len(kv_heads)),
                       (attn_path, "num_key_value_heads", len(kv_heads)),
                       (attn_path, "config", LayerConfig(attn.config, num_attention_heads=len(q_heads)))]
        return plan

    def ffn_ops(self, model, adapter, mlp, keep):
        half = model.get_submodule(f"{mlp}.gate_up_proj").out_features // 2
        return [_Op(f"{mlp}.gate_up_proj", "outputs", np.concatenate([keep, half + keep]))]

    def uniform_fields(self, model, adapter, sizes, uniform):
        # Phi3Config derives head_dim from hidden_size / num_attention_heads: only the FFN size is expressible
        return [{"intermediate_size": sizes["neurons"]}] if "neurons" in uniform else []


class MoESurgeon(LlamaSurgeon):
    """The MoE adapter's families: the Llama attention (where it has plain
    heads); neurons of the stacked experts (gate_up_proj rows of both halves,
    down_proj columns, the same number per expert), of dense FFN layers
    (Llama), and of the shared expert(s). Sizes per layer: heads and kv_heads
    (plain attention), neurons (dense layers), expert_neurons and
    shared_neurons (MoE layers)."""

    name = "moe"

    @staticmethod
    def _expert_field(config) -> str:
        # most MoE configs size their experts by moe_intermediate_size (intermediate_size: dense FFNs);
        # Mixtral and OLMoE by intermediate_size
        return "moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else "intermediate_size"

    def plan(self, model, adapter, site, keep):
        if "experts" in site.extra:
            per_expert = keep.size // site.extra["experts"]
            eager = getattr(text_config(model.config), "_experts_implementation", None) == "eager"
            if per_expert % EXPERT_MULTIPLE and per_expert * site.extra["experts"] != site.n_groups and not eager:
                raise SurgeryError(f"layer {site.layer} neurons: {per_expert} neurons per expert; transformers' "
                                   f"default grouped_mm experts kernel needs a multiple of {EXPERT_MULTIPLE}: keep "
                                   "one, or run the experts eagerly (model.config._experts_implementation = 'eager')")
            return Plan(site.consumer, keep, [_Op(site.consumer, "outputs", keep), _Op(site.consumer, "inputs", keep)])
        if site.structure == "shared-neurons":  # a Llama FFN inside the MoE block
            return self.ffn_plan(model, adapter, site.consumer.rpartition(".")[0], site.consumer, keep)
        return super().plan(model, adapter, site, keep)

    def layer_sizes(self, model, adapter, layer):
        block = adapter.block(layer)
        sizes = {}
        if adapter.plain_attention:
            sizes["heads"] = getattr(block.self_attn, adapter.out_proj).in_features // adapter.head_dim(layer)
            sizes["kv_heads"] = adapter.kv_heads(layer)
        if layer not in adapter.moe_layers:
            sizes["neurons"] = getattr(block.mlp, adapter.ffn_out).in_features
            return sizes
        sizes["expert_neurons"] = experts_layout(block.mlp.experts).neurons
        shared = adapter.shared_expert(layer)
        if shared:
            sizes["shared_neurons"] = getattr(block.mlp, shared).down_proj.in_features
        return sizes

    def standard_sizes(self, config):
        sizes = {"heads": getattr(config, "num_attention_heads", None),
                 "kv_heads": getattr(config, "num_key_value_heads", None),
                 "neurons": getattr(config, "intermediate_size", None),
                 "expert_neurons": getattr(config, self._expert_field(config), None)}
        n_shared = getattr(config, "n_shared_experts", None) or getattr(config, "moe_num_shared_experts", None)
        if getattr(config, "shared_expert_intermediate_size", None):
            sizes["shared_neurons"] = config.shared_expert_intermediate_size
        elif n_shared:  # DeepSeek-style: n_shared_experts experts' worth of neurons in one MLP
            sizes["shared_neurons"] = config.moe_intermediate_size * n_shared
        return sizes

    def uniform_fields(self, model, adapter, sizes, uniform):
        config = text_config(model.config)
        out = super().uniform_fields(model, adapter, sizes, uniform)  # heads; dense neurons: intermediate_size
        if "expert_neurons" in uniform:
            out.append({self._expert_field(config): sizes["expert_neurons"]})
        if "shared_neurons" in uniform and hasattr(config, "shared_expert_intermediate_size"):
            out.append({"shared_expert_intermediate_size": sizes["shared_neurons"]})
        return out

    def shrink_to(self, model, adapter, layer, sizes):
        if "heads" in sizes:
            self.shrink_attention(model, adapter, layer, sizes)
        cur = self.layer_sizes(model, adapter, layer)
        if "neurons" in sizes and sizes["neurons"] < cur["neurons"]:
            _remove(model, adapter, adapter.site("neurons", layer), np.arange(sizes["neurons"]), None)
        if "expert_neurons" in sizes and sizes["expert_neurons"] < cur["expert_neurons"]:
            n_experts = experts_layout(adapter.block(layer).mlp.experts).experts
            n = cur["expert_neurons"]
            keep = (np.arange(n_experts)[:, None] * n + np.arange(sizes["expert_neurons"])).ravel()
            _remove(model, adapter, adapter.site("neurons", layer), keep, None)
        if "shared_neurons" in sizes and sizes["shared_neurons"] < cur["shared_neurons"]:
            _remove(model, adapter, adapter.site("shared-neurons", layer), np.arange(sizes["shared_neurons"]), None)


class BertSurgeon(Surgeon):
    """BERT/RoBERTa: heads (query/key/value rows, attention.output.dense
    columns), neurons (intermediate.dense rows, output.dense columns)."""

    name = "bert"
    shrink_keys = (("heads", "heads"), ("neurons", "neurons"))

    def plan(self, model, adapter, site, keep):
        prefix = adapter.block_name(site.layer)
        if site.structure == "neurons":
            return Plan(site.consumer, keep, [_Op(f"{prefix}.intermediate.dense", "outputs", keep),
                                              _Op(site.consumer, "inputs", keep)])
        self_path = f"{prefix}.attention.self"
        hd = int(model.get_submodule(self_path).attention_head_size)
        rows = _rows(keep, hd)
        plan = Plan(site.consumer, rows, [_Op(f"{self_path}.{n}", "outputs", rows) for n in ("query", "key", "value")]
                    + [_Op(site.consumer, "inputs", rows)])
        _set_attr_if_present(plan, model, self_path, ("num_attention_heads",), keep.size)
        _set_attr_if_present(plan, model, self_path, ("all_head_size",), rows.size)
        return plan

    def layer_sizes(self, model, adapter, layer):
        block = adapter.block(layer)
        sa = block.attention.self
        return {"heads": sa.query.out_features // int(sa.attention_head_size),
                "neurons": block.intermediate.dense.out_features}

    def standard_sizes(self, config):
        return {"heads": config.num_attention_heads, "neurons": config.intermediate_size}

    def uniform_fields(self, model, adapter, sizes, uniform):
        # the head size is hidden_size / num_attention_heads: heads cannot be rewritten
        return [{"intermediate_size": sizes["neurons"]}] if "neurons" in uniform else []


class OPTSurgeon(Surgeon):
    """OPT: heads (q/k/v_proj rows, out_proj columns), neurons (fc1 rows, fc2 columns)."""

    name = "opt"
    shrink_keys = (("heads", "heads"), ("neurons", "neurons"))

    def plan(self, model, adapter, site, keep):
        prefix = adapter.block_name(site.layer)
        if site.structure == "neurons":
            return Plan(site.consumer, keep, [_Op(f"{prefix}.fc1", "outputs", keep),
                                              _Op(site.consumer, "inputs", keep)])
        attn_path = f"{prefix}.self_attn"
        hd = int(model.get_submodule(attn_path).head_dim)
        rows = _rows(keep, hd)
        ops = [_Op(f"{attn_path}.{n}", "outputs", rows) for n in ("q_proj", "k_proj", "v_proj")]
        plan = Plan(site.consumer, rows, ops + [_Op(site.consumer, "inputs", rows)])
        _set_attr_if_present(plan, model, attn_path, ("num_heads",), keep.size)
        return plan

    def layer_sizes(self, model, adapter, layer):
        block = adapter.block(layer)
        return {"heads": block.self_attn.q_proj.out_features // int(block.self_attn.head_dim),
                "neurons": block.fc1.out_features}

    def standard_sizes(self, config):
        return {"heads": config.num_attention_heads, "neurons": config.ffn_dim}

    def uniform_fields(self, model, adapter, sizes, uniform):
        return [{"ffn_dim": sizes["neurons"]}] if "neurons" in uniform else []


class GPT2Surgeon(Surgeon):
    """GPT-2: heads (c_attn columns of q, k and v, attn.c_proj rows), neurons
    (mlp.c_fc columns, mlp.c_proj rows); all transformers Conv1D."""

    name = "gpt2"
    shrink_keys = (("heads", "heads"), ("neurons", "neurons"))

    def plan(self, model, adapter, site, keep):
        prefix = adapter.block_name(site.layer)
        if site.structure == "neurons":
            return Plan(site.consumer, keep, [_Op(f"{prefix}.mlp.c_fc", "outputs", keep),
                                              _Op(site.consumer, "inputs", keep)])
        attn_path = f"{prefix}.attn"
        attn = model.get_submodule(attn_path)
        if getattr(attn, "is_cross_attention", False):
            raise SurgeryError(f"{attn_path} is a cross-attention: only GPT-2 self-attention heads can be removed")
        hd, split = int(attn.head_dim), int(attn.split_size)
        rows = _rows(keep, hd)
        cols = np.concatenate([rows, split + rows, 2 * split + rows])  # q, k, v blocks of c_attn
        plan = Plan(site.consumer, rows, [_Op(f"{attn_path}.c_attn", "outputs", cols),
                                          _Op(site.consumer, "inputs", rows)])
        _set_attr_if_present(plan, model, attn_path, ("num_heads",), keep.size)
        _set_attr_if_present(plan, model, attn_path, ("split_size",), rows.size)
        return plan

    def layer_sizes(self, model, adapter, layer):
        block = adapter.block(layer)
        return {"heads": int(block.attn.c_attn.nf) // 3 // int(block.attn.head_dim), "neurons": int(block.mlp.c_fc.nf)}

    def standard_sizes(self, config):
        return {"heads": config.n_head, "neurons": config.n_inner if config.n_inner is not None else 4 * config.n_embd}

    def uniform_fields(self, model, adapter, sizes, uniform):
        return [{"n_inner": sizes["neurons"]}] if "neurons" in uniform else []


class GPTNeoXSurgeon(Surgeon):
    """GPT-NeoX: heads (their 3 x head_size rows of query_key_value, q/k/v
    interleaved per head; attention.dense columns), neurons (dense_h_to_4h
    rows, dense_4h_to_h columns). The forward reads the head count from the
    shapes, so no attribute changes."""

    name = "gpt_neox"
    shrink_keys = (("heads", "heads"), ("neurons", "neurons"))

    def plan(self, model, adapter, site, keep):
        prefix = adapter.block_name(site.layer)
        if site.structure == "neurons":
            return Plan(site.consumer, keep, [_Op(f"{prefix}.mlp.dense_h_to_4h", "outputs", keep),
                                              _Op(site.consumer, "inputs", keep)])
        attn_path = f"{prefix}.attention"
        hd = int(model.get_submodule(attn_path).head_size)
        rows = _rows(keep, hd)
        return Plan(site.consumer, rows, [_Op(f"{attn_path}.query_key_value", "outputs", _rows(keep, 3 * hd)),
                                          _Op(site.consumer, "inputs", rows)])

    def layer_sizes(self, model, adapter, layer):
        block = adapter.block(layer)
        return {"heads": block.attention.dense.in_features // int(block.attention.head_size),
                "neurons": block.mlp.dense_h_to_4h.out_features}

    def standard_sizes(self, config):
        return {"heads": config.num_attention_heads, "neurons": config.intermediate_size}

    def uniform_fields(self, model, adapter, sizes, uniform):
        # the head size is hidden_size / num_attention_heads: heads cannot be rewritten
        return [{"intermediate_size": sizes["neurons"]}] if "neurons" in uniform else []


class ConvSurgeon(Surgeon):
    """CNNs: the producer conv's output channels (and bias), every BatchNorm
    between, the consumer conv's input channels."""

    name = "conv"
    shrink_keys = (("channels", "channels"),)

    def plan(self, model, adapter, site, keep):
        chain = adapter.chains[site.layer]
        ops = [_Op(chain["producer"], "outputs", keep)]
        ops += [_Op(norm, "outputs", keep) for norm in chain["norms"]]
        ops.append(_Op(site.consumer, "inputs", keep))
        return Plan(site.consumer, _rows(keep, site.group_size), ops)

    def layer_sizes(self, model, adapter, layer):
        return {"channels": model.get_submodule(adapter.chains[layer]["consumer"]).in_channels}


SURGEONS: dict[str, Surgeon] = {}


def register_surgeon(surgeon: Surgeon) -> Surgeon:
    """Add the surgery of another adapter family (keyed by the adapter's name)."""
    SURGEONS[surgeon.name] = surgeon
    return surgeon


for _s in (LlamaSurgeon(), MoESurgeon(), Phi3Surgeon(), BertSurgeon(), OPTSurgeon(), GPT2Surgeon(), GPTNeoXSurgeon(),
           ConvSurgeon()):
    register_surgeon(_s)


def _surgeon(adapter: Adapter) -> Surgeon:
    """The surgeon registered under the adapter's name, else under a parent
    adapter class's (StarCoder2 and Phi use the Llama surgery with their own module names)."""
    for cls in type(adapter).__mro__:
        name = getattr(cls, "name", None)
        if name in SURGEONS:
            return SURGEONS[name]
    raise SurgeryError(f"no surgery for {adapter.name!r} models: add one with "
                       "osscar_opt.surgery.register_surgeon")


# ---------------------------------------------------------------- validation
def _normalize_keep(site: Site, keep: Any) -> np.ndarray:
    arr = keep.detach().cpu().numpy() if isinstance(keep, torch.Tensor) else np.asarray(keep)
    where = f"layer {site.layer} {site.structure}"
    if arr.dtype == bool:
        if arr.shape != (site.n_groups,):
            raise SurgeryError(f"{where}: a boolean keep mask must have {site.n_groups} entries, got shape {arr.shape}")
        arr = np.flatnonzero(arr)
    if arr.ndim != 1:
        raise SurgeryError(f"{where}: keep must be a 1-D array of group ids, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise SurgeryError(f"{where}: keep must hold integer group ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size == 0:
        raise SurgeryError(f"{where}: keep at least one group: removing all {site.n_groups} groups "
                           "would remove the whole sub-layer, which remove_groups does not do")
    bad = arr[(arr < 0) | (arr >= site.n_groups)]
    if bad.size:
        raise SurgeryError(f"{where}: group ids {bad[:5].tolist()} are out of range: "
                           f"this site has groups 0..{site.n_groups - 1}")
    if np.unique(arr).size != arr.size:
        raise SurgeryError(f"{where}: keep has repeated group ids: give each kept group once")
    arr = np.sort(arr)
    if site.partition is not None:
        parts = np.asarray(site.partition)
        counts = np.bincount(parts[arr], minlength=int(parts.max()) + 1)
        if np.any(counts != counts[0]):
            raise SurgeryError(f"{where}: kept heads per KV group are {counts.tolist()}: keep the same number of "
                               "query heads in every KV group (GQA needs heads = kv_heads x heads-per-group)")
    return arr


def _check_site(adapter: Adapter, site: Site) -> None:
    current = adapter.site(site.structure, site.layer)
    if (current.consumer, current.n_groups, current.group_size, current.partition) != \
            (site.consumer, site.n_groups, site.group_size, site.partition):
        raise SurgeryError(
            f"site layer {site.layer} {site.structure} is stale: it says {site.n_groups} groups of {site.group_size} "
            f"rows at {site.consumer}, the model now has {current.n_groups} groups of {current.group_size} at "
            f"{current.consumer}: take a fresh site from adapter_for(model).site(...) after each removal"
        )


def _check_weights(model: nn.Module, site: Site, plan: Plan, weights: Any) -> torch.Tensor | None:
    if weights is None:
        return None
    W = weights.detach().cpu() if isinstance(weights, torch.Tensor) else torch.from_numpy(np.asarray(weights))
    consumer = model.get_submodule(site.consumer)
    d = site.n_groups * site.group_size
    m = weight_matrix(consumer).shape[1]
    where = f"layer {site.layer} {site.structure}"
    if tuple(W.shape) != (d, m):
        raise SurgeryError(f"{where}: refit weights have shape {tuple(W.shape)}, expected ({d}, {m}) "
                           "(all input rows of the consumer, zero outside the kept groups)")
    if not torch.isfinite(W).all():
        raise SurgeryError(f"{where}: refit weights contain NaN or inf: re-solve the site or pass weights=None")
    outside = torch.ones(d, dtype=torch.bool)
    outside[torch.from_numpy(plan.rows)] = False
    if outside.any() and W[outside].abs().max() > 0:
        raise SurgeryError(f"{where}: refit weights are nonzero on rows of removed groups: those inputs disappear, "
                           "so zero them (or pass weights=None to keep the original kept rows)")
    return W[torch.from_numpy(plan.rows)]


def _alias_key(t: torch.Tensor) -> tuple[int, int] | None:
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return (t.data_ptr(), t.numel())


def _check_plan(model: nn.Module, plan: Plan) -> None:
    """Every module exists, has a pruner, the indices fit, and no weight is shared."""
    owners: dict[int, list[str]] = {}
    aliases: dict[tuple[int, int], list[str]] = {}  # same memory under another Parameter object
    for name, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        owners.setdefault(id(t), []).append(name)
        if _alias_key(t):
            aliases.setdefault(_alias_key(t), []).append(name)
    for op in plan.ops:
        module = model.get_submodule(op.path)
        if op.param is not None:
            size = getattr(module, op.param).shape[0]
        else:
            pruner = pruner_for(module)
            size = pruner.n_outputs(module) if op.side == "outputs" else pruner.n_inputs(module)
        if op.index.size and (op.index.min() < 0 or op.index.max() >= size):
            raise SurgeryError(f"{op.path} has {size} {op.side} but the removal refers to index "
                               f"{int(op.index.max())}: the site does not match this model")
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise SurgeryError(f"{op.path} is a grouped convolution (groups={module.groups}): not supported")
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for pname, t in tensors:
            if op.param is not None and pname != op.param:
                continue
            mine = f"{op.path}.{pname}"
            others = [n for n in owners.get(id(t), []) if n != mine]
            others += [n for n in aliases.get(_alias_key(t), []) if n != mine and n not in others]
            if others:
                raise SurgeryError(f"{mine} is shared with {others[0]} (tied weights): removing channels would "
                                   "change both; untie it first, e.g. "
                                   "module.weight = nn.Parameter(module.weight.detach().clone())")


# ------------------------------------------------------------------- removal
def _plan(model: nn.Module, adapter: Adapter, site: Site, keep: Any, weights: Any) -> tuple[Plan, torch.Tensor | None]:
    surgeon = _surgeon(adapter)
    _check_site(adapter, site)
    keep_arr = _normalize_keep(site, keep)
    plan = surgeon.plan(model, adapter, site, keep_arr)
    _check_plan(model, plan)
    return plan, _check_weights(model, site, plan, weights)


def _execute(model: nn.Module, plan: Plan, new_weight: torch.Tensor | None) -> None:
    with torch.no_grad():
        for op in plan.ops:
            module = model.get_submodule(op.path)
            index = torch.from_numpy(np.ascontiguousarray(op.index, dtype=np.int64))
            if op.param is not None:
                old = getattr(module, op.param)
                setattr(module, op.param, nn.Parameter(old.detach().index_select(0, index.to(old.device)).contiguous(),
                                                       requires_grad=old.requires_grad))
                continue
            pruner = pruner_for(module)
            (pruner.keep_outputs if op.side == "outputs" else pruner.keep_inputs)(module, index)
        if new_weight is not None:
            set_weight_matrix(model.get_submodule(plan.consumer), new_weight)
    for path, name, value in plan.attrs:
        setattr(model.get_submodule(path), name, value)


def _remove(model: nn.Module, adapter: Adapter, site: Site, keep: Any, weights: Any) -> None:
    plan, new_weight = _plan(model, adapter, site, keep, weights)
    _execute(model, plan, new_weight)


def check_prunable(model: nn.Module, site: Site) -> None:
    """Raise SurgeryError now if `site` could not be pruned (e.g. a shared
    weight), so a driver can refuse before touching any layer."""
    adapter = adapter_for(model)
    surgeon = _surgeon(adapter)
    _check_site(adapter, site)
    _check_plan(model, surgeon.plan(model, adapter, site, np.arange(site.n_groups)))


def remove_groups(model: nn.Module, site: Site, keep: Any, weights: Any = None) -> None:
    """Physically remove every group of `site` not in `keep`, in place.

    keep: group ids kept (any order, unique; or a boolean mask of n_groups).
        At least one group must stay (no structure here removes a whole
        sub-layer); Llama GQA heads must keep the same number per KV group.
    weights: refit consumer weights (d x m, rows = all input features, zero
        outside the kept groups), written as the new consumer weight; None
        keeps the original kept rows. The consumer's bias is kept either way.

    Removed: the consumer's input rows of the removed groups and the producer
    outputs that feed only those rows (see the module docstring); head-count
    attributes of the attention module are updated, and so is the config
    (`sync_config`). Raises SurgeryError, leaving the model untouched, when
    the site is stale, keep is invalid, the weights do not fit, or a touched
    weight is shared with another module.
    """
    adapter = adapter_for(model)
    _remove(model, adapter, site, keep, weights)
    sync_config(model, adapter)


# -------------------------------------------------------------------- config
def layer_sizes(model: nn.Module, adapter: Adapter | None = None) -> list[dict[str, int]]:
    """Every layer's current sizes, read from the modules themselves."""
    adapter = adapter or adapter_for(model)
    surgeon = _surgeon(adapter)
    return [surgeon.layer_sizes(model, adapter, i) for i in range(adapter.n_layers)]


def plain_loadable(model: nn.Module) -> bool:
    """Whether the standard config fields describe every layer (from_pretrained reloads it)."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    adapter = adapter_for(model)
    return _standard(_surgeon(adapter).standard_sizes(text_config(config)), layer_sizes(model, adapter))


def _standard(expected: dict[str, int] | None, sizes: list[dict[str, int]]) -> bool:
    """Whether the standard sizes describe every layer (each on the sizes it has: an MoE
    model's dense layers have FFN neurons, its MoE layers expert neurons)."""
    return expected is not None and all(s == {k: expected.get(k) for k in s} for s in sizes)


_NOTE = ("layers of this pruned model differ from what the standard config fields describe "
         "(osscar_layer_sizes): load it with osscar_opt.surgery.load_pruned(path); "
         "from_pretrained fails with a size mismatch")


def _block_shapes(model_class: type, config: Any, prefix: str) -> dict[str, tuple] | None:
    """Parameter shapes of one block of a model built from `config` on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            fresh = model_class(config)
    except Exception:  # noqa: BLE001 - a model class that cannot be built this way: no check possible
        return None
    return {k: tuple(v.shape) for k, v in fresh.state_dict().items() if k.startswith(prefix + ".")}


def _config_describes(model: nn.Module, adapter: Adapter, fields: dict[str, int]) -> bool:
    """Whether `fields` may be written to the model's config: the config class's own
    validation (transformers 5 strict configs) accepts them, and from_pretrained would build
    the blocks closer to this model: some parameter shapes that differed now match, and none that
    matched differs (StableLM derives head_dim from hidden_size / heads and ignores a written
    head_dim: its pruned heads cannot be described by the config)."""
    config = model.config
    if all(getattr(text_config(config), name, None) == int(value) for name, value in fields.items()):
        return True
    trial = copy.deepcopy(config)
    for name, value in fields.items():
        setattr(text_config(trial), name, int(value))
    validate = getattr(trial, "validate", None)
    try:
        if validate is not None:
            validate()
    except Exception:  # noqa: BLE001 - any validation failure means "not expressible"
        return False
    prefix = adapter.layers_path  # every block: an MoE model's dense and MoE layers take different fields
    before = _block_shapes(type(model), config, prefix)
    if before is None:
        return True  # the class cannot be built this way here: trust the config class's own validation
    after = _block_shapes(type(model), trial, prefix)
    if after is None:
        return False  # the class refuses these values (StableLM: hidden_size % heads != 0)
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix + ".")}
    wrong_before = {k for k, shape in before.items() if mine.get(k) != shape}
    wrong_after = {k for k, shape in after.items() if mine.get(k) != shape}
    # a block built from them must not be smaller than this model's anywhere (load_pruned only shrinks):
    # DeepSeek-style shared experts are sized by the routed experts' field times n_shared_experts
    smaller = any(len(shape) == len(mine[k]) and any(a < b for a, b in zip(shape, mine[k]))
                  for k, shape in after.items() if k in mine)
    # the fields must fix shapes and break none (with StableLM's derived head_dim they fix nothing)
    return wrong_after < wrong_before and not smaller


def sync_config(model: nn.Module, adapter: Adapter | None = None) -> None:
    """Make model.config describe the pruned model (see the module docstring).

    Writes `osscar_layer_sizes`; sizes equal in every layer go to the
    standard fields where the config can express them; `osscar_note` is set
    while the standard fields cannot describe every layer. No-op without a
    config (plain CNNs: `save_pruned` records their sizes instead).
    """
    config = getattr(model, "config", None)
    if config is None:
        return
    adapter = adapter or adapter_for(model)
    surgeon = _surgeon(adapter)
    sizes = layer_sizes(model, adapter)
    values: dict[str, set[int]] = {}
    for s in sizes:
        for key, value in s.items():
            values.setdefault(key, set()).add(value)
    # the sizes equal in every layer that has them
    common = {key: next(iter(v)) for key, v in values.items() if len(v) == 1}
    for fields in surgeon.uniform_fields(model, adapter, common, set(common)):
        if _config_describes(model, adapter, fields):
            for name, value in fields.items():
                setattr(text_config(config), name, int(value))  # a multimodal model's language part
    config.osscar_layer_sizes = [dict(s) for s in sizes]
    if _standard(surgeon.standard_sizes(text_config(config)), sizes):
        if hasattr(config, "osscar_note"):
            del config.osscar_note
    else:
        config.osscar_note = _NOTE


# ----------------------------------------------------------------- save/load
_MODULE_META = "osscar_pruned.json"


def _normal_permissions(folder: Path) -> None:
    """mkdtemp makes the folder private: give it and its files the umask's modes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)


def save_pruned(model: nn.Module, tokenizer: Any, path: str | Path, overwrite: bool = False) -> Path:
    """Save a pruned model (and its tokenizer, when given) into `path`.

    Written into a temporary folder beside `path`, then renamed into place,
    so an interrupted save never leaves a half-written model at `path`.
    Hugging Face models: `save_pretrained` with the synced config. Plain
    torch modules (CNNs): `model.safetensors` plus `osscar_pruned.json` with
    the input channels of every prunable conv; reload with
    `load_pruned(path, model=<a dense instance of the same class>)`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise SurgeryError(f"{path} already exists: pass overwrite=True or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        if hasattr(model, "save_pretrained") and getattr(model, "config", None) is not None:
            sync_config(model)
            model.save_pretrained(tmp)
        else:
            st = require("safetensors.torch", "models", "saving a pruned model")
            adapter = adapter_for(model)
            st.save_model(model, str(tmp / "model.safetensors"))
            meta = {"format": "osscar-pruned-module", "version": 1,
                    "class": f"{type(model).__module__}.{type(model).__qualname__}",
                    "architecture": adapter.name,
                    "layer_sizes": layer_sizes(model, adapter),
                    "consumers": [adapter.block_name(i) for i in range(adapter.n_layers)]}
            (tmp / _MODULE_META).write_text(json.dumps(meta, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _normal_permissions(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
        try:
            tmp.rename(path)
        except OSError:
            if old is not None:
                old.rename(path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _shrink(model: nn.Module, sizes: list[dict], source: str) -> None:
    adapter = adapter_for(model)
    surgeon = _surgeon(adapter)
    if len(sizes) != adapter.n_layers:
        raise SurgeryError(f"{source} records {len(sizes)} layers but the model has {adapter.n_layers}: "
                           "pass a model of the same architecture")
    for layer, target in enumerate(sizes):
        current = surgeon.layer_sizes(model, adapter, layer)
        if set(target) != set(current) or any(int(target[k]) > current[k] for k in target
                                              if k not in surgeon.growable):
            raise SurgeryError(f"{source}: layer {layer} records sizes {target} but the freshly built model has "
                               f"{current}: it must be at least as large in every layer")
        surgeon.shrink_to(model, adapter, layer, {k: int(v) for k, v in target.items()})
    sync_config(model, adapter)


def _model_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's keys renamed the way transformers' from_pretrained
    renames them for this model (save_pretrained writes some heads under their
    hub names, e.g. GPT-NeoX's lm_head as embed_out); unchanged where the keys
    already match or transformers has no renaming for the model."""
    own = set(model.state_dict())
    if set(state) <= own:
        return state
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [c for c in get_model_conversion_mapping(model, add_legacy=False) if isinstance(c, WeightRenaming)]
        renamed = {rename_source_key(k, renamings, [])[0]: v for k, v in state.items()}
    except Exception:  # noqa: BLE001 - another transformers version or a plain module: the keys as saved
        return state
    return renamed if len(renamed) == len(state) and set(renamed) <= own else state


def _convert_and_load(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Load a checkpoint whose tensors transformers converts on loading
    (save_pretrained writes Mixtral's stacked experts back as one w1/w2/w3
    Linear per expert): transformers' own conversion into this model.
    False where that loader is unavailable or leaves any key unmatched."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        dtype = next(model.parameters()).dtype
        twins: dict[int, list[str]] = {}  # tied parameters (lm_head and the embeddings): one object, several names
        for name, t in model.named_parameters(remove_duplicate=False):
            twins.setdefault(id(t), []).append(name)
        config = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model), dtype=dtype)
        info = convert_and_load_state_dict_in_model(model, state, config)[0]
    except Exception:  # noqa: BLE001 - another transformers version: the plain load and its error message
        return False
    if info.unexpected_keys or info.mismatched_keys or info.error_msgs or info.conversion_errors:
        return False
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in info.missing_keys:  # the loader replaces parameters: tie the missing twin to the loaded one
        loaded = [n for names in twins.values() if name in names for n in names if n not in info.missing_keys]
        if not loaded or name not in params:
            return False
        path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(path), attr, params[loaded[0]])
    return True


def _load_weights(model: nn.Module, path: Path, dtype: torch.dtype | None) -> None:
    st = require("safetensors.torch", "models", "loading a pruned model")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SurgeryError(f"{path} has no *.safetensors weights: save it with osscar_opt.surgery.save_pruned")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(st.load_file(str(f)))
    state = _model_keys(model, state)
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    model.to(dtype or (floating[0] if floating else torch.float32))
    if not set(state) <= set(model.state_dict()) and _convert_and_load(model, state):
        return
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise SurgeryError(f"{path} holds weights the model lacks ({result.unexpected_keys[0]}, ...): "
                           "pass a model of the same architecture")
    loaded = {id(t) for n, t in model.state_dict(keep_vars=True).items() if n in state}
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    missing = [k for k in result.missing_keys if id(named.get(k)) not in loaded]  # tied weights load via their twin
    if missing:
        raise SurgeryError(f"{path} lacks weights the model has ({', '.join(missing[:3])}): pass model=<an instance "
                           "built like the saved one> (e.g. without the extra head or pooler)")


def load_pruned(path: str | Path, model: nn.Module | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model written by `save_pruned`, layer sizes included.

    Hugging Face models: the class named in config.json's `architectures` is
    built from the config (or `model`, a dense instance built the same way, is
    used), each layer is shrunk to `config.osscar_layer_sizes` with
    `remove_groups`, then the saved weights are loaded. Plain modules need
    `model`, a dense instance of the saved class. Returns the model in eval
    mode; load the tokenizer with AutoTokenizer.from_pretrained(path).
    """
    path = Path(path)
    if not path.is_dir():
        raise SurgeryError(f"no saved model folder at {path}: give the folder save_pruned wrote")
    if (path / "config.json").exists():
        transformers = require("transformers", "models", "loading a pruned Hugging Face model")
        config = transformers.AutoConfig.from_pretrained(path)
        if model is None:
            arch = (getattr(config, "architectures", None) or [None])[0]
            cls = getattr(transformers, arch, None) if arch else None
            if cls is None:
                raise SurgeryError(f"{path}/config.json names no known architecture ({arch!r}): "
                                   "pass model=<a dense instance of the saved class>")
            model = cls(config)
        elif getattr(model.config, "model_type", None) != config.model_type:
            raise SurgeryError(f"{path} holds a {config.model_type!r} model but model= is "
                               f"{getattr(model.config, 'model_type', None)!r}: pass the same architecture")
        sizes = getattr(config, "osscar_layer_sizes", None)
        if sizes is not None:
            _shrink(model, sizes, f"{path}/config.json")
    elif (path / _MODULE_META).exists():
        meta = json.loads((path / _MODULE_META).read_text())
        if model is None:
            raise SurgeryError(f"{path} holds a plain torch module ({meta.get('class')}): "
                               "pass model=<a dense instance of that class> to load_pruned")
        adapter = adapter_for(model)
        consumers = [adapter.block_name(i) for i in range(adapter.n_layers)]
        if consumers != meta["consumers"]:
            raise SurgeryError(f"{path} was saved from a model with prunable convs {meta['consumers']}, "
                               f"this one has {consumers}: pass an instance of {meta.get('class')}")
        _shrink(model, meta["layer_sizes"], f"{path}/{_MODULE_META}")
    else:
        raise SurgeryError(f"{path} has neither config.json nor {_MODULE_META}: "
                           "not a model saved by osscar_opt.surgery.save_pruned")
    _load_weights(model, path, dtype)
    return model.eval()

