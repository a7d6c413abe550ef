"""Architecture adapters: where the prunable groups of a model live.

A *site* is one structure of one layer: the module whose input rows are
pruned (the consumer: o_proj / out_proj / c_proj / dense for heads,
down_proj / fc2 / c_proj / output.dense / dense_4h_to_h for neurons, a
Conv2d for input channels), how its rows form groups, and which modules
produce those rows (removed together with them).

One small adapter class per architecture family, kept in a dict keyed by name
that users can extend with `register_adapter` (the Torch-Pruning pattern).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from .errors import OsscarError


class UnsupportedModelError(OsscarError, ValueError):
    """The model, layer or structure is not supported by any adapter."""


@dataclass(frozen=True)
class Site:
    layer: int
    structure: str
    consumer: str  # dotted module path whose input rows are the groups
    n_groups: int
    group_size: int
    partition: tuple[int, ...] | None = None  # part id per group (e.g. KV group of a query head)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def id(self) -> str:
        return f"l{self.layer}-{self.structure}"


# ------------------------------------------------------------ module helpers
def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D: a linear layer with weight stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_experts(module: nn.Module | None) -> bool:
    """transformers' stacked mixture-of-experts weights (the `*Experts` modules
    of Mixtral, Qwen3-MoE, DeepSeek-V3, gpt-oss, ...): 3-D gate_up_proj and
    down_proj tensors, one slice per expert (`experts_layout`)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3 \
        and down.dim() == 3


@dataclass(frozen=True)
class ExpertsLayout:
    """How a stacked-experts module stores its weights (the flags transformers'
    `use_experts_implementation` sets on it).

    Default (Mixtral, Qwen3-MoE, ...): gate_up_proj (experts, 2n, hidden)
    with the n gate rows first, down_proj (experts, hidden, n). transposed
    (gpt-oss): gate_up_proj (experts, hidden, 2n), down_proj (experts, n,
    hidden). interleaved (gpt-oss): gate and up outputs alternate (gate of
    neuron j at 2j, up at 2j + 1). bias: gate_up_proj_bias (experts, 2n) and
    down_proj_bias (experts, hidden)."""

    experts: int
    neurons: int
    transposed: bool = False
    interleaved: bool = False
    bias: bool = False

    def gate_up_index(self, keep: torch.Tensor) -> torch.Tensor:
        """Positions on gate_up_proj's 2n axis of kept neurons `keep` (experts x k)."""
        if self.interleaved:
            return torch.stack([2 * keep, 2 * keep + 1], dim=-1).reshape(keep.shape[0], -1)
        return torch.cat([keep, self.neurons + keep], dim=1)


def experts_layout(module: nn.Module) -> ExpertsLayout:
    """The `ExpertsLayout` of a stacked-experts module (`is_experts`)."""
    transposed = bool(getattr(module, "is_transposed", False))
    down = module.down_proj
    return ExpertsLayout(int(down.shape[0]), int(down.shape[1] if transposed else down.shape[2]), transposed,
                         not getattr(module, "is_concatenated", True), bool(getattr(module, "has_bias", False)))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The consumer's weight as W_hat (d x m): rows are input features (for
    stacked experts, expert e's neurons are rows e x neurons .. (e + 1) x neurons - 1)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().T
    if is_experts(module):
        down = module.down_proj.detach()
        if experts_layout(module).transposed:  # (experts, n, hidden)
            return down.reshape(-1, down.shape[2])
        return down.transpose(1, 2).reshape(-1, down.shape[1])
    if is_conv1d(module):
        return module.weight.detach()
    if isinstance(module, nn.Conv2d):
        w = module.weight.detach()
        return w.reshape(w.shape[0], -1).T  # rows ordered (in_channel, kh, kw)
    raise UnsupportedModelError(f"cannot prune the inputs of a {type(module).__name__}: use Linear, Conv1D or Conv2d")


def set_weight_matrix(module: nn.Module, W: torch.Tensor) -> None:
    """Write W (d x m, rows = input features) back into the consumer module."""
    if is_experts(module):
        old, layout = module.down_proj, experts_layout(module)
        new = W.reshape(layout.experts, -1, W.shape[1])  # (experts, neurons, hidden)
        if not layout.transposed:
            new = new.transpose(1, 2)
        module.down_proj = nn.Parameter(new.to(device=old.device, dtype=old.dtype).contiguous(),
                                        requires_grad=old.requires_grad)
        return
    dtype, device = module.weight.dtype, module.weight.device
    if isinstance(module, nn.Linear):
        new = W.T
    elif is_conv1d(module):
        new = W
    elif isinstance(module, nn.Conv2d):
        out = module.weight.shape[0]
        kh, kw = module.kernel_size
        new = W.T.reshape(out, -1, kh, kw)
    else:
        raise UnsupportedModelError(f"cannot write the weights of a {type(module).__name__}")
    module.weight = nn.Parameter(new.to(device=device, dtype=dtype).contiguous(), requires_grad=module.weight.requires_grad)


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The consumer's input as rows (n x d) matching `weight_matrix`."""
    if isinstance(module, nn.Conv2d):
        padding = module.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = 0
            else:  # "same" with stride 1: symmetric for odd kernels
                if any(k % 2 == 0 for k in module.kernel_size):
                    raise UnsupportedModelError("Conv2d padding='same' with an even kernel is not supported")
                padding = tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
        if module.padding_mode != "zeros":
            raise UnsupportedModelError(f"Conv2d padding_mode={module.padding_mode!r} is not supported: use 'zeros'")
        cols = torch.nn.functional.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _first_path(model: nn.Module, candidates: tuple[str, ...]) -> str | None:
    for path in candidates:
        try:
            model.get_submodule(path)
            return path
        except AttributeError:
            continue
    return None


def text_config(config):
    """The config of the language model: the text sub-config of a multimodal
    model (Gemma3's vision-language models), else the config itself."""
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get()
        except Exception:  # noqa: BLE001 - an older or custom config: take it as it is
            return config
    return config


_HEAD_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


def head_norm_problem(attn: nn.Module, head_dim: int) -> str | None:
    """Why the attention's heads cannot be removed because of its query/key
    norms, or None. Norms shared by every head (one head_dim-sized norm:
    Qwen3, Gemma3) survive head removal; norms with parameters per head or
    across all heads (StableLM's qk_layernorm, OLMo2, OLMoE) would have to
    change with it."""
    for name in _HEAD_NORMS:
        norm = getattr(attn, name, None)
        if not isinstance(norm, nn.Module):
            continue
        sizes = [int(p.numel()) for p in norm.parameters()]
        if len(sizes) > 2 or any(n != head_dim for n in sizes):
            return f"{name} has parameters per head or across heads ({sum(sizes)} for head_dim {head_dim})"
    return None


# ------------------------------------------------------------------ adapters
class Adapter:
    """Base class: subclass, set the class attributes, `register_adapter`."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    structures: ClassVar[tuple[str, ...]] = ()
    default_structures: ClassVar[tuple[str, ...]] = ("heads", "neurons")
    layer_paths: ClassVar[tuple[str, ...]] = ()  # candidate paths of the block list
    body_paths: ClassVar[tuple[str, ...]] = ()  # the model without its task head

    def __init__(self, model: nn.Module):
        self.model = model
        path = _first_path(model, self.layer_paths)
        if path is None:
            raise UnsupportedModelError(f"{type(model).__name__} has none of {self.layer_paths}: not a {self.name} model")
        self.layers_path = path
        self.body_path = _first_path(model, self.body_paths) if self.body_paths else ""

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in cls.model_types

    @property
    def n_layers(self) -> int:
        return len(_get(self.model, self.layers_path))

    def block_name(self, layer: int) -> str:
        return f"{self.layers_path}.{layer}"

    def block(self, layer: int) -> nn.Module:
        return _get(self.model, self.block_name(layer))

    def body(self) -> nn.Module:
        return _get(self.model, self.body_path) if self.body_path else self.model

    def check_layer(self, layer: int) -> None:
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.n_layers:
            raise UnsupportedModelError(
                f"layer {layer!r} is out of range: this {self.name} model has layers 0..{self.n_layers - 1}"
            )

    def check_structure(self, structure: str) -> None:
        if structure not in self.structures:
            raise UnsupportedModelError(
                f"{self.name} models have no structure {structure!r}: choose from {', '.join(self.structures)}"
            )

    def site(self, structure: str, layer: int) -> Site:
        self.check_structure(structure)
        self.check_layer(layer)
        return self._site(structure, int(layer))

    def sites(self, structures, layers=None) -> list[Site]:
        layers = range(self.n_layers) if layers is None else layers
        return [self.site(s, layer) for layer in layers for s in structures if self.has_site(s, layer)]

    def has_site(self, structure: str, layer: int) -> bool:
        """Whether this layer has that (supported) structure: False only where
        layers differ (the shared expert of an MoE model's dense layers)."""
        return True

    def _site(self, structure: str, layer: int) -> Site:
        raise NotImplementedError

    def dense_targets_unsupported(self) -> str | None:
        """Why targets='dense' (a linear correction toward the dense residual
        stream) cannot be fitted on this model, or None when it can."""
        return None

    def residual_scale(self, structure: str, layer: int) -> float:
        """The factor a site's consumer output is multiplied by where it is
        added to the residual stream (1 but for e.g. Granite's residual_multiplier)."""
        return 1.0

    def residual_point(self, structure: str, layer: int) -> tuple[str, str] | None:
        """Where the hidden state that a site's consumer output is added to
        (the residual sum) can be read: (module path, "input") for the first
        input of that module, (block path, "output") for the block's output;
        None where that structure's sites keep layer targets (MoE experts)."""
        raise UnsupportedModelError(f"{self.name} models do not say where their residual sums are: "
                                    "use targets='layer'")


class LlamaAdapter(Adapter):
    """Llama family (Llama, SmolLM2, Mistral, Qwen2, Qwen3, Gemma, Gemma2,
    Gemma3 with the text tower of its vision-language models, OLMo, OLMo2,
    Granite, StableLM, Cohere), grouped-query attention; sequential or
    parallel residual (Cohere, StableLM's option: attention and FFN both
    added at the block output). Subclasses set other module names.

    heads      query heads: head_dim input rows of o_proj each, partitioned by
               KV group so that every KV group keeps the same number
    query-heads  query heads chosen freely (no per-KV-group budget): where
               KV groups keep different numbers of query heads, KV heads are
               duplicated so the model stays valid GQA (kept heads per group
               c_j, g = gcd(c_j): c_j / g copies of KV head j, g query heads
               per copy); k_proj/v_proj may then grow
    kv-groups  whole KV groups (their query heads, k and v heads)
    neurons    FFN neurons: input rows of down_proj (gate/up rows produce them)
    """

    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "olmo",
                   "olmo2", "granite", "stablelm", "cohere")
    structures = ("heads", "query-heads", "kv-groups", "neurons")
    layer_paths = ("model.layers", "layers", "model.language_model.layers")  # the last: Gemma3's text tower
    body_paths = ("model",)
    # module names inside self_attn and mlp (members of the family that name them otherwise override)
    out_proj: ClassVar[str] = "o_proj"  # the heads' consumer
    ffn_in: ClassVar[tuple[str, ...]] = ("gate_proj", "up_proj")  # the neurons' producers
    ffn_out: ClassVar[str] = "down_proj"  # the neurons' consumer

    def __init__(self, model: nn.Module):
        super().__init__(model)
        attn = getattr(self.block(0), "self_attn", None)
        if attn is not None and hasattr(attn, "head_dim") and head_norm_problem(attn, int(attn.head_dim)):
            # heads cannot be removed (asked for, they are refused with the reason): neurons by default
            self.default_structures = tuple(s for s in self.default_structures if s != "heads")

    def head_dim(self, layer: int) -> int:
        attn = self.block(layer).self_attn
        return int(attn.head_dim)

    def kv_heads(self, layer: int) -> int:
        return int(self.block(layer).self_attn.k_proj.out_features) // self.head_dim(layer)

    def _site(self, structure: str, layer: int) -> Site:
        prefix = self.block_name(layer)
        if structure == "neurons":
            down = _get(self.model, f"{prefix}.mlp.{self.ffn_out}")
            return Site(layer, structure, f"{prefix}.mlp.{self.ffn_out}", down.in_features, 1)
        attn = self.block(layer).self_attn
        hd = self.head_dim(layer)
        n_heads = getattr(attn, self.out_proj).in_features // hd
        n_kv = self.kv_heads(layer)
        rep = n_heads // n_kv
        extra = {"head_dim": hd, "heads": n_heads, "kv_heads": n_kv}
        consumer = f"{prefix}.self_attn.{self.out_proj}"
        if structure == "heads":
            parts = tuple(h // rep for h in range(n_heads))
            return Site(layer, structure, consumer, n_heads, hd, parts, extra)
        if structure == "query-heads":
            return Site(layer, structure, consumer, n_heads, hd, None, extra)
        return Site(layer, structure, consumer, n_kv, hd * rep, None, extra)

    def dense_targets_unsupported(self) -> str | None:
        if hasattr(self.block(0), "post_feedforward_layernorm"):
            return (f"{type(self.model).__name__} normalizes each attention and FFN output before adding it to "
                    "the residual stream (sandwich norms, as in Gemma2/3 and OLMo2), so the residual gap is not "
                    "linear in the pruned layer's output")
        return None

    def residual_scale(self, structure: str, layer: int) -> float:
        return float(getattr(self.block(layer), "residual_multiplier", 1.0))  # Granite

    def residual_point(self, structure: str, layer: int) -> tuple[str, str]:
        if structure == "neurons" or getattr(self.block(layer), "post_attention_layernorm", None) is None:
            return self.block_name(layer), "output"  # also both outputs of a parallel-residual block
        return f"{self.block_name(layer)}.post_attention_layernorm", "input"


class Phi3Adapter(LlamaAdapter):
    """Phi-3 (Phi-3/3.5, Phi-4-mini): the Llama structures on fused projections,
    q/k/v rows of qkv_proj and gate/up rows of gate_up_proj."""

    name = "phi3"
    model_types = ("phi3",)

    def kv_heads(self, layer: int) -> int:
        return int(self.block(layer).self_attn.num_key_value_heads)


class Starcoder2Adapter(LlamaAdapter):
    """StarCoder2: the Llama structures, neurons of mlp.c_proj (c_fc rows produce them)."""

    name = "starcoder2"
    model_types = ("starcoder2",)
    ffn_in = ("c_fc",)
    ffn_out = "c_proj"


class PhiAdapter(LlamaAdapter):
    """Phi-1/1.5/2: the Llama structures on self_attn.dense (heads) and
    mlp.fc2 (neurons, fc1 rows produce them); parallel residual."""

    name = "phi"
    model_types = ("phi",)
    out_proj = "dense"
    ffn_in = ("fc1",)
    ffn_out = "fc2"


# transformers runs stacked experts with grouped_mm by default, which needs 16-byte aligned rows:
# experts keep a multiple of 8 neurons (bf16/fp16; fp32 needs 4)
EXPERT_MULTIPLE = 8


class MoEAdapter(LlamaAdapter):
    """Mixture-of-experts models with transformers' stacked experts (Mixtral,
    OLMoE, Qwen2-MoE, Qwen3-MoE, GLM-4.5 (glm4_moe), DeepSeek-V2/V3, dots1,
    ERNIE-4.5-MoE, gpt-oss with its transposed, interleaved, biased expert
    weights (`experts_layout`) and per-head attention sinks): MoE layers, and
    dense FFN layers where the model mixes them (first_k_dense_replace,
    mlp_only_layers). The Llama attention structures (not for multi-head
    latent attention: DeepSeek), and

    neurons         in an MoE layer, FFN neurons of every routed expert. The
                    stacked weights need the same number of neurons in every
                    expert, so the groups (experts x neurons, expert e's
                    neurons at e x neurons ..) are partitioned by expert with
                    one budget each (a multiple of 8 neurons: transformers'
                    default grouped_mm kernel needs 16-byte aligned rows), and
                    each expert is its own instance (`expert_sites`): its Gram
                    matrix sums the neuron activations of the tokens routed
                    to it, weighted by their routing weights (the factor its
                    output is added with); refit to its own output (layer
                    targets). In a dense layer, the Llama FFN neurons.
    shared-neurons  neurons of the shared expert(s) of MoE layers (Qwen2-MoE's
                    gated `shared_expert`, DeepSeek-style `shared_experts`),
                    layer targets
    """

    name = "moe"
    model_types = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "glm4_moe", "deepseek_v2", "deepseek_v3", "dots1",
                   "ernie4_5_moe", "gpt_oss")
    structures = LlamaAdapter.structures + ("shared-neurons",)
    _SHARED = ("shared_expert", "shared_experts")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        kind = getattr(getattr(model, "config", None), "model_type", "")
        self.moe_layers: set[int] = set()
        for layer in range(self.n_layers):
            mlp = self.block(layer).mlp
            experts = getattr(mlp, "experts", None)
            if experts is None:
                if not isinstance(getattr(mlp, self.ffn_out, None), nn.Linear):
                    raise UnsupportedModelError(f"layer {layer} of this {kind} model has neither stacked experts "
                                                f"nor a dense {self.ffn_out}: not supported")
                continue
            if not is_experts(experts):
                raise UnsupportedModelError(f"the experts of layer {layer} of this {kind} model are not stacked "
                                            "(gate_up_proj / down_proj tensors): not supported")
            if not experts.gate_up_proj.is_floating_point():
                raise UnsupportedModelError(
                    f"the experts of this {kind} model are quantized ({experts.gate_up_proj.dtype} "
                    f"{type(experts).__name__}): load it dequantized, e.g. from_pretrained(..., "
                    "quantization_config=transformers.Mxfp4Config(dequantize=True)) for MXFP4")
            # transposed, interleaved and biased weights (gpt-oss) are read by `experts_layout`; experts
            # without a gate (up_proj only) or with a norm after down_proj are not
            odd = [f"{k}={getattr(experts, k)}" for k, ok in (("has_gate", True), ("has_post_expert_norm", False))
                   if getattr(experts, k, ok) != ok]
            if odd:
                raise UnsupportedModelError(f"the experts of this {kind} model are stored with {', '.join(odd)}: "
                                            "only gated experts without a norm after down_proj are supported")
            self.moe_layers.add(layer)
        if not self.moe_layers:
            raise UnsupportedModelError(f"this {kind} model has no MoE layer: prune it as a dense model")
        attn = self.block(0).self_attn
        self.plain_attention = all(isinstance(getattr(attn, n, None), nn.Linear)
                                   for n in ("q_proj", "k_proj", "v_proj", self.out_proj))
        heads = self.plain_attention and "heads" in self.default_structures  # not OLMoE's (its q/k norms)
        self.default_structures = (("heads",) if heads else ()) + ("neurons",) + \
            (("shared-neurons",) if any(self.shared_expert(i) for i in self.moe_layers) else ())

    def shared_expert(self, layer: int) -> str | None:
        """Name of the layer's shared-expert module inside its mlp, or None."""
        mlp = self.block(layer).mlp
        return next((n for n in self._SHARED if isinstance(getattr(mlp, n, None), nn.Module)), None)

    def check_structure(self, structure: str) -> None:
        super().check_structure(structure)
        kind = self.model.config.model_type
        if structure == "shared-neurons" and not any(self.shared_expert(i) for i in self.moe_layers):
            raise UnsupportedModelError(f"this {kind} model has no shared expert: choose from "
                                        f"{', '.join(self.default_structures)}")
        if structure not in ("neurons", "shared-neurons") and not self.plain_attention:
            raise UnsupportedModelError(f"this {kind} model's attention has no q_proj/k_proj/v_proj heads "
                                        "(multi-head latent attention): its heads are not supported; prune "
                                        "neurons (structures=['neurons', 'shared-neurons'])")

    def has_site(self, structure: str, layer: int) -> bool:
        return structure != "shared-neurons" or self.shared_expert(layer) is not None

    def _site(self, structure: str, layer: int) -> Site:
        mlp = f"{self.block_name(layer)}.mlp"
        if structure == "neurons" and layer in self.moe_layers:
            layout = experts_layout(self.block(layer).mlp.experts)
            n_experts, n = layout.experts, layout.neurons
            return Site(layer, structure, f"{mlp}.experts", n_experts * n, 1,
                        tuple(np.repeat(np.arange(n_experts), n).tolist()),
                        {"experts": n_experts, "multiple": EXPERT_MULTIPLE})
        if structure == "shared-neurons":
            name = self.shared_expert(layer)
            if name is None:
                raise UnsupportedModelError(f"layer {layer} has no shared expert")
            down = _get(self.model, f"{mlp}.{name}.down_proj")
            return Site(layer, structure, f"{mlp}.{name}.down_proj", down.in_features, 1)
        return super()._site(structure, layer)

    def residual_point(self, structure: str, layer: int) -> tuple[str, str] | None:
        # routed experts and shared experts are scaled per token: their sites keep layer targets
        if structure == "shared-neurons" or (structure == "neurons" and layer in self.moe_layers):
            return None
        return super().residual_point(structure, layer)


def expert_sites(site: Site) -> list[Site]:
    """One site per expert of a stacked-experts site (`MoEAdapter` neurons):
    the expert's neurons as groups 0..n-1, `extra["expert"]` its index;
    [site] for any other site."""
    n_experts = site.extra.get("experts")
    if not n_experts:
        return [site]
    n = site.n_groups // n_experts
    return [Site(site.layer, site.structure, site.consumer, n, site.group_size, None,
                 {**site.extra, "expert": e, "offset": e * n}) for e in range(n_experts)]


def site_weight(model: nn.Module, site: Site) -> torch.Tensor:
    """W_hat (d x m) of a site: the consumer's weight matrix, or the rows of
    one expert for a site from `expert_sites`."""
    W = weight_matrix(_get(model, site.consumer))
    if "expert" in site.extra:
        start = site.extra["offset"] * site.group_size
        return W[start: start + site.n_groups * site.group_size]
    return W


class BertAdapter(Adapter):
    """BERT encoders (MiniLM): heads of attention.output.dense, neurons of output.dense."""

    name = "bert"
    model_types = ("bert", "roberta")
    structures = ("heads", "neurons")
    layer_paths = ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer")
    body_paths = ("bert", "roberta")

    def _site(self, structure: str, layer: int) -> Site:
        prefix = self.block_name(layer)
        if structure == "neurons":
            inter = _get(self.model, f"{prefix}.intermediate.dense")
            return Site(layer, structure, f"{prefix}.output.dense", inter.out_features, 1)
        self_attn = _get(self.model, f"{prefix}.attention.self")
        hd = int(self_attn.attention_head_size)
        n_heads = self_attn.query.out_features // hd
        return Site(layer, structure, f"{prefix}.attention.output.dense", n_heads, hd, None, {"head_dim": hd})


    def residual_point(self, structure: str, layer: int) -> tuple[str, str]:
        # post-LN: LayerNorm(dense(x) + residual), the sum read before the norm
        prefix = self.block_name(layer)
        return (f"{prefix}.output.LayerNorm" if structure == "neurons" else
                f"{prefix}.attention.output.LayerNorm"), "input"


class OPTAdapter(Adapter):
    """OPT decoders: heads of self_attn.out_proj, neurons of fc2."""

    name = "opt"
    model_types = ("opt",)
    structures = ("heads", "neurons")
    layer_paths = ("model.decoder.layers", "decoder.layers")
    body_paths = ("model",)

    def _site(self, structure: str, layer: int) -> Site:
        prefix = self.block_name(layer)
        if structure == "neurons":
            fc1 = _get(self.model, f"{prefix}.fc1")
            return Site(layer, structure, f"{prefix}.fc2", fc1.out_features, 1)
        attn = _get(self.model, f"{prefix}.self_attn")
        hd = int(attn.head_dim)
        return Site(layer, structure, f"{prefix}.self_attn.out_proj", attn.out_proj.in_features // hd, hd, None,
                    {"head_dim": hd})


    def residual_point(self, structure: str, layer: int) -> tuple[str, str]:
        prefix = self.block_name(layer)
        if getattr(self.model.config, "do_layer_norm_before", True):  # pre-LN (all but OPT-350m)
            return (prefix, "output") if structure == "neurons" else (f"{prefix}.final_layer_norm", "input")
        return f"{prefix}.{'final_layer_norm' if structure == 'neurons' else 'self_attn_layer_norm'}", "input"


class GPT2Adapter(Adapter):
    """GPT-2: heads of attn.c_proj, neurons of mlp.c_proj (both transformers Conv1D)."""

    name = "gpt2"
    model_types = ("gpt2",)
    structures = ("heads", "neurons")
    layer_paths = ("transformer.h", "h")
    body_paths = ("transformer",)

    def _site(self, structure: str, layer: int) -> Site:
        prefix = self.block_name(layer)
        if structure == "neurons":
            c_fc = _get(self.model, f"{prefix}.mlp.c_fc")
            return Site(layer, structure, f"{prefix}.mlp.c_proj", int(c_fc.nf), 1)
        attn = _get(self.model, f"{prefix}.attn")
        hd = int(attn.head_dim)
        return Site(layer, structure, f"{prefix}.attn.c_proj", attn.c_proj.weight.shape[0] // hd, hd, None,
                    {"head_dim": hd})


    def residual_point(self, structure: str, layer: int) -> tuple[str, str]:
        prefix = self.block_name(layer)
        return (prefix, "output") if structure == "neurons" else (f"{prefix}.ln_2", "input")


class GPTNeoXAdapter(Adapter):
    """GPT-NeoX (Pythia): heads of attention.dense (3 x head_size rows of the
    fused query_key_value each, q/k/v interleaved per head), neurons of
    mlp.dense_4h_to_h; parallel residual (the default) or sequential."""

    name = "gpt_neox"
    model_types = ("gpt_neox",)
    structures = ("heads", "neurons")
    layer_paths = ("gpt_neox.layers", "layers")
    body_paths = ("gpt_neox",)

    def _site(self, structure: str, layer: int) -> Site:
        prefix = self.block_name(layer)
        if structure == "neurons":
            up = _get(self.model, f"{prefix}.mlp.dense_h_to_4h")
            return Site(layer, structure, f"{prefix}.mlp.dense_4h_to_h", up.out_features, 1)
        attn = _get(self.model, f"{prefix}.attention")
        hd = int(attn.head_size)
        return Site(layer, structure, f"{prefix}.attention.dense", attn.dense.in_features // hd, hd, None,
                    {"head_dim": hd})

    def residual_point(self, structure: str, layer: int) -> tuple[str, str]:
        prefix = self.block_name(layer)
        if structure == "neurons" or self.block(layer).use_parallel_residual:
            # parallel: x + attn(ln1(x)) + mlp(ln2(x)), both outputs join the residual at the block output
            return prefix, "output"
        return f"{prefix}.post_attention_layernorm", "input"


class ConvAdapter(Adapter):
    """Plain CNNs: input channels of a Conv2d (kh*kw rows each) whose producer
    is another Conv2d reached only through BatchNorm2d and element-wise or
    pooling modules; its output channels (and the BatchNorm) are removed too.

    Layers are numbered over the prunable convolutions in execution order.
    """

    name = "conv"
    structures = ("channels",)
    default_structures = ("channels",)
    _PASS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Identity,
             nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Dropout2d)

    def dense_targets_unsupported(self) -> str | None:
        return "a CNN has no residual stream to correct toward"

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers_path = ""
        self.body_path = ""
        self.chains = self._chains(model)
        if not self.chains:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no Conv2d whose input channels come straight from another Conv2d"
            )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return getattr(model, "config", None) is None and any(isinstance(m, nn.Conv2d) for m in model.modules())

    @classmethod
    def _chains(cls, model: nn.Module) -> list[dict]:
        """(producer conv, [batchnorm], consumer conv) chains found by torch.fx."""
        import torch.fx

        try:
            graph = torch.fx.symbolic_trace(model).graph
        except Exception as exc:
            raise UnsupportedModelError(f"cannot trace {type(model).__name__} with torch.fx ({exc}): "
                                        "only traceable CNNs are supported") from None
        modules = dict(model.named_modules())
        users = {n: list(n.users) for n in graph.nodes}
        chains = []
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d):
                continue
            consumer = modules[node.target]
            if consumer.groups != 1:
                continue
            norms: list[str] = []
            cur = node.args[0] if node.args else None
            producer = None
            while isinstance(cur, torch.fx.Node) and len(users[cur]) == 1:
                if cur.op == "call_module":
                    mod = modules[cur.target]
                    if isinstance(mod, nn.Conv2d):
                        producer = cur.target if mod.groups == 1 else None
                        break
                    if isinstance(mod, nn.BatchNorm2d):
                        norms.append(cur.target)
                    elif not isinstance(mod, cls._PASS):
                        break
                elif cur.op == "call_function" and getattr(cur.target, "__name__", "") in (
                    "relu", "gelu", "silu", "max_pool2d", "avg_pool2d", "dropout", "tanh", "sigmoid"
                ):
                    pass
                else:
                    break
                cur = cur.args[0] if cur.args else None
            if producer is not None and modules[producer].out_channels == consumer.in_channels:
                chains.append({"producer": producer, "norms": norms, "consumer": node.target})
        return chains

    @property
    def n_layers(self) -> int:
        return len(self.chains)

    def block_name(self, layer: int) -> str:
        return self.chains[layer]["consumer"]

    def _site(self, structure: str, layer: int) -> Site:
        chain = self.chains[layer]
        conv = _get(self.model, chain["consumer"])
        kh, kw = conv.kernel_size
        return Site(layer, structure, chain["consumer"], conv.in_channels, kh * kw, None,
                    {"producer": chain["producer"], "norms": list(chain["norms"])})


ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    ADAPTERS[cls.name] = cls
    return cls


for _cls in (LlamaAdapter, MoEAdapter, Phi3Adapter, Starcoder2Adapter, PhiAdapter, BertAdapter, OPTAdapter,
             GPT2Adapter, GPTNeoXAdapter, ConvAdapter):
    register_adapter(_cls)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of the first registered family that matches the model."""
    for cls in ADAPTERS.values():
        if cls.matches(model):
            return cls(model)
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    raise UnsupportedModelError(
        f"no adapter for {kind!r} models: supported are {', '.join(ADAPTERS)} "
        f"(model types {', '.join(t for c in ADAPTERS.values() for t in c.model_types)} and traceable CNNs); "
        "add one with osscar_opt.adapters.register_adapter"
    )
