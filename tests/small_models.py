"""Small models of every supported architecture, built in-process (random
weights from a fixed seed) for architecture tests."""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, ffn=96, vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(layers=2, heads=4, hidden=48, ffn=80, vocab=128):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, max_position_embeddings=256)
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_opt(layers=2, heads=4, hidden=48, ffn=80, vocab=128):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
                    num_attention_heads=heads, word_embed_proj_dim=hidden, max_position_embeddings=256)
    return OPTForCausalLM(cfg).eval()


def tiny_gpt2(layers=2, heads=4, hidden=48, ffn=80, vocab=128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=256)
    return GPT2LMHeadModel(cfg).eval()


def tiny_gpt_neox(layers=2, heads=4, hidden=48, ffn=80, vocab=128, parallel=True):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, max_position_embeddings=256, use_parallel_residual=parallel,
                        tie_word_embeddings=False)
    return GPTNeoXForCausalLM(cfg).eval()


class SmallCNN(nn.Module):
    """8x8 digit classifier: three convolutions, BatchNorm, pooling, linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(24, 32, 3, padding=1)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.conv3(x))
        return self.head(x.mean((2, 3)))


def random_tokens(n=6, seq_len=32, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g)


def tiny_llama_like(kind: str, layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, ffn=96, vocab=128, **config):
    """Other members of the Llama family the llama adapter takes: Qwen2 (q/k/v
    biases), Mistral (sliding-window attention), Qwen3 (per-head q/k RMSNorm),
    Gemma (GeLU gate, scaled embeddings), Gemma2 (sandwich norms, logit
    soft-capping, sliding-window and full attention layers in turn), Gemma3
    (Gemma2's layout with per-head q/k norms and a rotary table per layer kind),
    OLMo (parameter-free LayerNorm), OLMo2 (sandwich norms, q/k norms across
    all heads), Cohere (parallel residual), Granite (residual_multiplier 0.5 here),
    StableLM (LayerNorm, partial rotary; `use_parallel_residual=True` for the
    parallel block, `qk_layernorm=True` for norms per head), StarCoder2
    (c_fc / c_proj FFN, biases), Phi-2 (dense / fc1 / fc2, parallel residual)
    and Phi-3 (fused qkv_proj and gate_up_proj). Where the config has no head_dim, the hidden
    size is heads x head_dim. The sliding windows (8 tokens) are shorter than
    the test windows. `config`: further config fields."""
    import transformers

    names = {"qwen2": "Qwen2", "mistral": "Mistral", "qwen3": "Qwen3", "gemma": "Gemma", "gemma2": "Gemma2",
             "gemma3": "Gemma3Text", "phi3": "Phi3", "olmo": "Olmo", "granite": "Granite", "stablelm": "StableLm", "olmo2": "Olmo2", "cohere": "Cohere",
             "starcoder2": "Starcoder2", "phi": "Phi"}[kind]
    config_cls = getattr(transformers, f"{names}Config", None)
    model_cls = getattr(transformers, f"{names.removesuffix('Text')}ForCausalLM", None)
    if config_cls is None or model_cls is None:  # Qwen3 needs transformers >= 4.51, Gemma3 >= 4.50
        import pytest

        pytest.skip(f"transformers {transformers.__version__} has no {names} models")
    torch.manual_seed(0)
    extra = {}
    if kind == "mistral":
        extra = {"sliding_window": 8}
    elif kind in ("gemma2", "gemma3"):
        extra = {"sliding_window": 8, "layer_types": [("sliding_attention", "full_attention")[i % 2]
                                                      for i in range(layers)]}
    elif kind == "granite":
        extra = {"residual_multiplier": 0.5}
    if kind in ("phi3", "olmo", "olmo2", "granite", "stablelm", "cohere", "starcoder2", "phi"):
        hidden = heads * head_dim
    else:
        extra["head_dim"] = head_dim
    cfg = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads,
                     max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     **{**extra, **config})
    return model_cls(cfg).eval()


def tiny_gemma3_vlm(layers=2, vocab=300):
    """Gemma3's vision-language model (SigLIP tower, projector, Gemma3 text
    tower): the language model sits at model.language_model and its sizes in
    config.text_config; sliding-window and full attention layers in turn."""
    import transformers

    if not hasattr(transformers, "Gemma3ForConditionalGeneration"):
        import pytest

        pytest.skip(f"transformers {transformers.__version__} has no Gemma3 models")
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                sliding_window=8, layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
                pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=vocab - 1,
                       boi_token_index=vocab - 3, eoi_token_index=vocab - 2)
    return Gemma3ForConditionalGeneration(cfg).eval()


def tiny_moe(kind: str, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=48, experts=4, vocab=128, **config):
    """Mixture-of-experts models, 4 routed experts of 48 neurons, 2 per
    token: Mixtral, OLMoE (q/k norms across all heads), Qwen2-MoE (a gated
    shared expert of 80 neurons), Qwen3-MoE (per-head q/k norms), and with a
    dense first layer (96 neurons) and a shared expert of 48: GLM-4.5
    (glm4_moe, per-head q/k norms), dots1, ERNIE-4.5-MoE and DeepSeek-V3
    (multi-head latent attention, sigmoid routing); gpt-oss (transposed,
    interleaved gate/up expert weights with biases, attention biases and
    sinks, sliding-window layers; its biases and sinks drawn at random, not
    left at their zero init). `config`: further fields."""
    import transformers

    names = {"mixtral": "Mixtral", "olmoe": "Olmoe", "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe",
             "glm4_moe": "Glm4Moe", "dots1": "Dots1", "ernie4_5_moe": "Ernie4_5_Moe",
             "deepseek_v3": "DeepseekV3", "gpt_oss": "GptOss"}[kind]
    config_cls = getattr(transformers, f"{names}Config", None)
    model_cls = getattr(transformers, f"{names}ForCausalLM", None)
    if config_cls is None or model_cls is None:
        import pytest

        pytest.skip(f"transformers {transformers.__version__} has no {names} models")
    torch.manual_seed(0)
    dense_first = {"n_routed_experts": experts, "n_shared_experts": 1, "first_k_dense_replace": 1,
                   "moe_intermediate_size": ffn, "intermediate_size": 96, "n_group": 1, "topk_group": 1}
    extra = {"mixtral": {"num_local_experts": experts, "intermediate_size": ffn, "head_dim": head_dim},
             "olmoe": {"num_experts": experts, "intermediate_size": ffn},
             "qwen2_moe": {"num_experts": experts, "moe_intermediate_size": ffn, "intermediate_size": 96,
                           "shared_expert_intermediate_size": 80},
             "qwen3_moe": {"num_experts": experts, "moe_intermediate_size": ffn, "intermediate_size": 96,
                           "head_dim": head_dim},
             "glm4_moe": {**dense_first, "head_dim": head_dim, "use_qk_norm": True},
             "dots1": {**dense_first, "head_dim": head_dim},
             "ernie4_5_moe": {"moe_num_experts": experts, "moe_num_shared_experts": 1, "moe_layer_start_index": 1,
                              "moe_intermediate_size": ffn, "intermediate_size": 96, "moe_k": 2},
             "deepseek_v3": {**dense_first, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                             "qk_rope_head_dim": 8, "v_head_dim": 16},
             "gpt_oss": {"num_local_experts": experts, "intermediate_size": ffn, "head_dim": head_dim,
                         "sliding_window": 8, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}}[kind]
    cfg = config_cls(vocab_size=vocab, hidden_size=heads * head_dim, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, num_experts_per_tok=2,
                     max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     **{**extra, **config})
    model = model_cls(cfg).eval()
    if kind == "gpt_oss":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("bias", "sinks")):
                    p.copy_(torch.randn_like(p) * (1.0 if name.endswith("sinks") else 0.1))
    return model


ARCHITECTURES = {
    "llama": tiny_llama,
    "bert": tiny_bert,
    "opt": tiny_opt,
    "gpt2": tiny_gpt2,
    "gpt_neox": tiny_gpt_neox,
}


def digits_cnn(epochs: int = 10, seed: int = 0):
    """A SmallCNN trained on scikit-learn's bundled 8x8 digits (real data, no
    download) for a few seconds. Returns (model in eval mode, test images,
    test labels); 1397 images train it, the other 400 test it."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    train, test = order[:-400], order[-400:]
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: extra threads only contend on a shared CPU
    try:
        for _ in range(epochs):
            for batch in torch.randperm(len(train), generator=g).split(64):
                idx = train[batch]
                opt.zero_grad()
                nn.functional.cross_entropy(model(images[idx]), labels[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), images[test], labels[test]
