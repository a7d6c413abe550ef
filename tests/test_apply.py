"""The model driver on small models of every architecture (built in-process)
and on a CNN trained on real data (scikit-learn's digits)."""

import copy
import math
import re

import numpy as np
import pytest
import torch

import osscar_opt as oo
from osscar_opt.adapters import UnsupportedModelError, adapter_for, weight_matrix
from osscar_opt.apply import PruneError, apply, count_parameters
from osscar_opt.data import DataError
from osscar_opt.extract import CORRECTION_RIDGES
from osscar_opt.errors import InstanceError, OsscarError
from osscar_opt.surgery import load_pruned, save_pruned

from small_models import ARCHITECTURES, digits_cnn, random_tokens, tiny_llama


def _refit_reference(dense, pruned, report):
    """The dense model with every pruned consumer's weight replaced by the
    pruned model's weights on the kept rows and zeros elsewhere."""
    ref = copy.deepcopy(dense)
    for site in report.sites:
        consumer = ref.get_submodule(site.module)
        W_dense = weight_matrix(consumer)
        W_new = torch.zeros_like(W_dense)
        b = W_dense.shape[0] // site.groups
        rows = (np.asarray(site.keep)[:, None] * b + np.arange(b)).ravel()
        W_new[torch.as_tensor(rows)] = weight_matrix(pruned.get_submodule(site.module)).to(W_new.dtype)
        from osscar_opt.adapters import set_weight_matrix

        set_weight_matrix(consumer, W_new)
    return ref


def _out(model, x):
    with torch.no_grad():
        out = model(x)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state if hasattr(out, "last_hidden_state")
            else out)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("sequential", [True, False])
def test_apply_removes_groups_physically_and_matches_the_refit_dense_model(arch, sequential, tmp_path):
    dense = ARCHITECTURES[arch](layers=2)
    model = copy.deepcopy(dense)
    tokens = random_tokens(n=8, seq_len=24)
    report = apply(model, tokens, {"heads": 0.5, "neurons": 0.25}, sequential=sequential, progress=False)
    adapter = adapter_for(model)
    assert len(report.sites) == 2 * adapter.n_layers
    assert report.targets == ("dense" if sequential else "layer")  # the defaults for a transformer
    for site in report.sites:
        expected = max(1, round((0.5 if site.structure == "heads" else 0.75) * site.groups))
        if arch == "llama" and site.structure == "heads":
            expected = 2  # one of the two query heads of each KV group
        assert site.kept == len(site.keep) == expected
        assert 0.0 <= site.err <= 1.0 and site.status == "FEASIBLE"
        assert adapter.site(site.structure, site.layer).n_groups == site.kept  # physically smaller
    assert report.params_after == count_parameters(model) < report.params_before
    x = random_tokens(n=2, seq_len=24, seed=5)
    reference = _refit_reference(dense, model, report)
    np.testing.assert_allclose(_out(model, x).numpy(), _out(reference, x).numpy(), atol=2e-5, rtol=1e-4)
    # save and reload give the same outputs
    save_pruned(model, None, tmp_path / "m")
    again = load_pruned(tmp_path / "m", model=ARCHITECTURES[arch](layers=2) if arch == "bert" else None)
    np.testing.assert_allclose(_out(again, x).numpy(), _out(model, x).numpy(), atol=1e-6)


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo",
                                  "granite", "stablelm", "cohere", "starcoder2", "phi"])
def test_llama_family_members_prune_reload_and_match_the_refit_dense_model(kind, tmp_path):
    """The llama adapter's other model types, each structure: physically
    smaller (biases too), the outputs of the refit dense model, the same
    outputs after save and reload with per-layer sizes. Gemma2/3 (sandwich
    norms) are refit to layer targets by default and refuse dense ones."""
    from small_models import tiny_llama_like

    x = random_tokens(n=2, seq_len=24, seed=5)
    for sparsity in ({"query-heads": 0.25, "neurons": {0: 0.5, 1: 0.25}}, {"kv-groups": 0.5},
                     {"heads": {0: 0.5, 1: 0.0}}):
        dense = tiny_llama_like(kind)
        model = copy.deepcopy(dense)
        report = apply(model, random_tokens(n=8, seq_len=24), sparsity, progress=False)
        assert report.params_after < report.params_before
        assert report.targets == ("layer" if kind in ("gemma2", "gemma3") else "dense")
        attn = model.model.layers[0].self_attn
        if kind == "phi3":  # fused: qkv rows of the kept query heads and KV heads, gate and up halves alike
            hd = attn.head_dim
            assert attn.qkv_proj.out_features == attn.o_proj.in_features + 2 * attn.num_key_value_heads * hd
            assert attn.config.num_attention_heads * hd == attn.o_proj.in_features < 4 * 16
            for block in model.model.layers:
                assert block.mlp.gate_up_proj.out_features == 2 * block.mlp.down_proj.in_features
        else:
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                assert proj.bias is None or proj.bias.shape == (proj.out_features,)
            assert (attn.q_proj.bias is not None) == (kind in ("qwen2", "starcoder2", "phi"))
            out = attn.dense if kind == "phi" else attn.o_proj
            assert out.in_features == attn.q_proj.out_features < 4 * 16
        reference = _refit_reference(dense, model, report)
        np.testing.assert_allclose(_out(model, x).numpy(), _out(reference, x).numpy(), atol=2e-5, rtol=1e-4)
        assert not np.allclose(_out(model, x).numpy(), _out(dense, x).numpy(), atol=1e-3)
        saved = save_pruned(model, None, tmp_path / kind, overwrite=True)
        again = load_pruned(saved)
        assert type(again) is type(model)
        np.testing.assert_allclose(_out(again, x).numpy(), _out(model, x).numpy(), atol=1e-6)
    if kind in ("gemma2", "gemma3"):
        model = tiny_llama_like(kind)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(PruneError, match="sandwich norms.*use targets='layer'"):
            apply(model, random_tokens(n=8, seq_len=24), 0.5, targets="dense", progress=False)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gemma3_vision_language_model_prunes_its_text_tower(tmp_path):
    """Gemma3's vision-language model: heads and neurons of the text tower
    (model.language_model) are pruned with layer targets (sandwich norms),
    the vision tower and projector are left as they were, the outputs equal
    the refit dense model's, and the model reloads with the same outputs;
    the text sub-config carries the sizes."""
    from small_models import tiny_gemma3_vlm

    dense = tiny_gemma3_vlm()
    model = copy.deepcopy(dense)
    tokens = random_tokens(n=8, seq_len=24, vocab=290)
    report = apply(model, tokens, {"heads": 0.5, "neurons": 0.5}, progress=False)
    assert report.targets == "layer" and [s.module for s in report.sites][:2] == [
        "model.language_model.layers.0.self_attn.o_proj", "model.language_model.layers.0.mlp.down_proj"]
    assert model.config.text_config.num_attention_heads == 2 and model.config.text_config.intermediate_size == 48
    for name, t in dense.model.vision_tower.state_dict().items():
        assert torch.equal(t, model.model.vision_tower.state_dict()[name])
    x = random_tokens(n=2, seq_len=24, vocab=290, seed=5)
    np.testing.assert_allclose(_out(model, x).numpy(), _out(_refit_reference(dense, model, report), x).numpy(),
                               atol=2e-5, rtol=1e-4)
    save_pruned(model, None, tmp_path / "vlm")
    again = load_pruned(tmp_path / "vlm")
    assert type(again) is type(model)
    np.testing.assert_allclose(_out(again, x).numpy(), _out(model, x).numpy(), atol=1e-6)


MOE_KINDS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "dots1", "ernie4_5_moe", "deepseek_v3",
             "gpt_oss"]


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_moe_models_prune_every_expert_reload_and_match_the_refit_dense_model(kind, tmp_path):
    """MoE models: each routed expert is solved on its own tokens and keeps
    the same number of neurons (stacked weights), shared experts and dense
    FFN layers (GLM-4.5, dots1, ERNIE, DeepSeek: layer 0) their own share;
    heads and dense layers with dense targets, experts with layer targets;
    the outputs equal the refit dense model's; per-layer sizes reload with
    load_pruned, uniform ones also with plain from_pretrained (the
    checkpoint holds one gate/up/down per expert, converted on load).
    Experts keep a multiple of 8 neurons (62.5% of 48 is 30: 32 kept).
    OLMoE's q/k norms span all heads: heads are refused, neurons prune;
    DeepSeek's latent attention has no heads to prune. gpt-oss stores its
    experts transposed, gate and up interleaved, with biases, and has one
    attention-sink logit per query head (removed with the head)."""
    import transformers
    from small_models import tiny_moe

    from osscar_opt.surgery import SurgeryError

    x = random_tokens(n=2, seq_len=24, seed=5)
    tokens = random_tokens(n=8, seq_len=24)
    dense = tiny_moe(kind)
    adapter = adapter_for(dense)
    if kind == "olmoe":
        model = copy.deepcopy(dense)
        with pytest.raises(SurgeryError, match=r"q_norm has parameters per head or across heads"):
            apply(model, tokens, {"heads": 0.5, "neurons": 0.5}, progress=False)
        assert all(torch.equal(v, dense.state_dict()[k]) for k, v in model.state_dict().items())
    heads = {} if kind in ("olmoe", "deepseek_v3") else {"heads": 0.5}
    has_shared = "shared-neurons" in adapter.default_structures
    assert adapter.default_structures == (() if kind in ("deepseek_v3", "olmoe") else ("heads",)) + ("neurons",) + \
        (("shared-neurons",) if has_shared else ())
    assert adapter.moe_layers == ({0, 1} if kind in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
                                  else {1})
    # uniform: DeepSeek-style shared experts are sized by the routed experts' field, so they prune alike
    for neurons, shared_frac, uniform in (({0: 0.5, 1: 0.375}, 0.25, False), (0.5, 0.5, True)):
        shared = {"shared-neurons": shared_frac} if has_shared else {}
        model = copy.deepcopy(dense)
        report = apply(model, tokens, {**heads, "neurons": neurons, **shared}, progress=False)
        assert report.targets == "dense" and report.params_after < report.params_before
        assert "| layer | experts | tokens min / median / max | experts without tokens |" in report.to_markdown()
        for site in report.sites:
            frac = 0.5 if uniform or site.layer == 0 else 0.375
            if site.structure == "neurons" and site.layer in adapter.moe_layers:
                per_expert = 24 if frac == 0.5 else 32
                experts = model.model.layers[site.layer].mlp.experts
                if kind == "gpt_oss":  # transposed, with biases
                    assert tuple(experts.down_proj.shape) == (4, per_expert, 64)
                    assert tuple(experts.gate_up_proj.shape) == (4, 64, 2 * per_expert)
                    assert tuple(experts.gate_up_proj_bias.shape) == (4, 2 * per_expert)
                    assert tuple(experts.down_proj_bias.shape) == (4, 64)
                else:
                    assert tuple(experts.down_proj.shape) == (4, 64, per_expert)
                    assert tuple(experts.gate_up_proj.shape) == (4, 2 * per_expert, 64)
                assert site.groups == 4 * 48 and site.kept == 4 * per_expert and site.target_fit is None
                assert [e["kept"] for e in site.experts] == [per_expert] * 4
                assert sum(e["samples"] for e in site.experts) == 2 * 8 * 24  # two experts per token
                assert site.err == pytest.approx(np.mean([e["err"] for e in site.experts]))
            elif site.structure == "neurons":  # a dense FFN layer
                assert site.groups == 96 and site.kept == round((1 - frac) * 96) and site.target_fit is not None
                assert model.model.layers[site.layer].mlp.up_proj.out_features == site.kept
            elif site.structure == "heads":
                assert site.kept == 2 and site.target_fit is not None
                if kind == "gpt_oss":  # the kept heads' own sinks
                    sinks = model.model.layers[site.layer].self_attn.sinks
                    dense_sinks = dense.model.layers[site.layer].self_attn.sinks
                    assert torch.equal(sinks, dense_sinks[torch.as_tensor(site.keep)])
            else:
                n = 80 if kind == "qwen2_moe" else 48
                assert site.structure == "shared-neurons" and site.kept == (1 - shared_frac) * n
                assert site.target_fit is None
                mlp = model.model.layers[site.layer].mlp
                assert (getattr(mlp, "shared_expert", None) or mlp.shared_experts).up_proj.out_features == site.kept
        np.testing.assert_allclose(_out(model, x).numpy(), _out(_refit_reference(dense, model, report), x).numpy(),
                                   atol=2e-5, rtol=1e-4)
        assert not np.allclose(_out(model, x).numpy(), _out(dense, x).numpy(), atol=1e-3)
        saved = save_pruned(model, None, tmp_path / kind, overwrite=True)
        again = load_pruned(saved)
        np.testing.assert_allclose(_out(again, x).numpy(), _out(model, x).numpy(), atol=1e-6)
        assert (getattr(again.config, "osscar_note", None) is None) == uniform
        if uniform:
            plain = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
            np.testing.assert_allclose(_out(plain, x).numpy(), _out(model, x).numpy(), atol=1e-6)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_expert_gram_is_what_the_moe_output_feels(kind):
    """The Gram matrix of an expert weighs its tokens as the MoE block does:
    changing that expert's down_proj weights by D changes the block's output
    on the calibration tokens by exactly n_e tr(D' G_e D) in squared norm
    (n_e tokens routed to it), measured by running the model itself."""
    from small_models import tiny_moe

    from osscar_opt.adapters import expert_sites
    from osscar_opt.extract import GramHooks, token_mask

    model = tiny_moe(kind)
    tokens = random_tokens(n=4, seq_len=24)
    mask = torch.ones(4, 24, dtype=torch.long)
    mask[0, 20:] = 0  # padded tokens stay out of the Gram matrices
    site = adapter_for(model).site("neurons", 0)
    with GramHooks(model, [site.consumer]) as hooks:
        hooks.mask = token_mask({"input_ids": tokens, "attention_mask": mask})
        with torch.no_grad():
            model(input_ids=tokens, attention_mask=mask)
    stats = hooks.site_stats(site)
    assert len(stats) == 4 and sum(n for _, n in stats) == 2 * (4 * 24 - 4)

    def routed_output(m):
        out = []
        handle = m.model.layers[0].mlp.experts.register_forward_hook(lambda mod, a, o: out.append(o.detach()))
        with torch.no_grad():
            m(input_ids=tokens, attention_mask=mask)
        handle.remove()
        return out[0].double()[mask.reshape(-1).bool()]

    base = routed_output(model)
    g = torch.Generator().manual_seed(1)
    for view, (gram, n) in zip(expert_sites(site), stats):
        e = view.extra["expert"]
        D = torch.randn(48, 64, generator=g, dtype=torch.float64) * 0.1
        changed = copy.deepcopy(model)
        with torch.no_grad():
            experts = changed.model.layers[0].mlp.experts
            experts.down_proj[e] += D.float() if kind == "gpt_oss" else D.T.float()  # gpt-oss: (neurons, hidden)
        felt = float(((routed_output(changed) - base) ** 2).sum())
        assert felt == pytest.approx(n * float(np.trace(D.numpy().T @ gram @ D.numpy())), rel=1e-3)


def test_moe_bad_inputs(tmp_path):
    """A structure the MoE model lacks, and heads of latent attention, are
    refused with the reason; a 30-neuron expert only where the experts run
    eagerly."""
    from small_models import tiny_moe

    with pytest.raises(UnsupportedModelError, match="no shared expert"):
        apply(tiny_moe("mixtral"), random_tokens(), {"shared-neurons": 0.5}, progress=False)
    with pytest.raises(UnsupportedModelError, match="multi-head latent attention.*structures=\\['neurons'"):
        apply(tiny_moe("deepseek_v3"), random_tokens(), {"heads": 0.5}, progress=False)
    # gpt-oss experts as an MXFP4 checkpoint loads them on a GPU (packed uint8 blocks): refused with the fix
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts

    model = tiny_moe("gpt_oss")
    model.model.layers[1].mlp.experts = Mxfp4GptOssExperts(model.config)
    with pytest.raises(UnsupportedModelError, match=r"quantized \(torch.uint8.*Mxfp4Config\(dequantize=True\)"):
        apply(model, random_tokens(), 0.5, progress=False)
    # experts pruned alike in every MoE layer, the shared expert otherwise: DeepSeek sizes both by
    # moe_intermediate_size, so the config cannot say it (a model built from it would be too small to load into)
    model = tiny_moe("deepseek_v3")
    apply(model, random_tokens(), {"neurons": 0.5, "shared-neurons": 0.25}, progress=False)
    assert model.config.moe_intermediate_size == 48 and model.config.osscar_note
    again = load_pruned(save_pruned(model, None, tmp_path / "deepseek"))
    x = random_tokens(n=2, seq_len=24, seed=5)
    np.testing.assert_allclose(_out(again, x).numpy(), _out(model, x).numpy(), atol=1e-6)
    # a dense layer among MoE layers has FFN neurons and no shared expert
    model = tiny_moe("qwen2_moe", mlp_only_layers=[1])
    report = apply(model, random_tokens(), 0.5, progress=False)
    assert [(s.layer, s.structure, s.groups) for s in report.sites] == [
        (0, "heads", 4), (0, "neurons", 192), (0, "shared-neurons", 80), (1, "heads", 4), (1, "neurons", 96)]
    # 30 neurons per expert: refused for the default grouped_mm kernel, taken when the experts run eagerly
    from osscar_opt.surgery import SurgeryError, remove_groups

    model = tiny_moe("mixtral")
    site = adapter_for(model).site("neurons", 0)
    keep = (np.arange(4)[:, None] * 48 + np.arange(30)).ravel()
    with pytest.raises(SurgeryError, match="multiple of 8.*_experts_implementation = 'eager'"):
        remove_groups(model, site, keep)
    assert model.model.layers[0].mlp.experts.down_proj.shape[2] == 48
    model.config._experts_implementation = "eager"
    remove_groups(model, site, keep)
    assert model.model.layers[0].mlp.experts.down_proj.shape[2] == 30
    assert torch.isfinite(_out(model, random_tokens(n=2, seq_len=24))).all()


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2", "gemma3", "gemma3-vlm"])
def test_captured_block_inputs_replay_the_model_block_by_block(kind):
    """The sequential driver re-runs each block on captured inputs: with each
    layer kind's own keyword inputs (Gemma2/3 alternate sliding-window and
    full attention, with different masks and, in Gemma3, rotary tables),
    block after block reproduces the model's own hidden states."""
    from small_models import tiny_llama_like

    from osscar_opt.apply import _capture_block_inputs, _layer_kinds, _run_block

    from small_models import tiny_gemma3_vlm

    model = tiny_llama(layers=3) if kind == "llama" else tiny_gemma3_vlm(layers=3) if kind == "gemma3-vlm" \
        else tiny_llama_like(kind, layers=3)
    adapter = adapter_for(model)
    x = random_tokens(n=4, seq_len=24)
    inputs = _capture_block_inputs(model, adapter, x, 2, None)
    kinds = _layer_kinds(model, adapter)
    assert len(set(kinds)) == (2 if kind.startswith("gemma") else 1)
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
    for layer in range(adapter.n_layers - 1):
        inputs = _run_block(adapter.block(layer), inputs, "cpu", True, kinds[layer])
        replay = torch.cat([args[0] for args, _, _ in inputs])
        torch.testing.assert_close(replay, hidden[layer + 1], atol=1e-5, rtol=1e-5)


def test_apply_query_heads_keeps_the_exact_head_count_of_a_gqa_model(tmp_path):
    """9 query heads in 3 KV groups at 50%: 'heads' must keep 2 per group
    (6), 'query-heads' keeps round(4.5) = 4 anywhere, duplicating KV heads
    where the groups differ; the model equals its refit dense reference
    and reloads."""
    dense = tiny_llama(heads=9, kv_heads=3, hidden=144)
    model = copy.deepcopy(dense)
    tokens = random_tokens(n=8, seq_len=24)
    report = apply(model, tokens, {"query-heads": 0.5}, progress=False)
    assert [s.kept for s in report.sites] == [4, 4]
    for site in report.sites:
        counts = np.bincount(np.asarray(site.keep) // 3, minlength=3)
        g = int(np.gcd.reduce(counts[counts > 0]))
        attn = model.model.layers[site.layer].self_attn
        assert attn.k_proj.out_features == 16 * 4 // g and attn.num_key_value_groups == g
    x = random_tokens(n=2, seq_len=24, seed=5)
    reference = _refit_reference(dense, model, report)
    np.testing.assert_allclose(_out(model, x).numpy(), _out(reference, x).numpy(), atol=2e-5, rtol=1e-4)
    save_pruned(model, None, tmp_path / "m")
    np.testing.assert_allclose(_out(load_pruned(tmp_path / "m"), x).numpy(), _out(model, x).numpy(), atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("start", ["cpu", "cuda"])
def test_apply_on_cuda_keeps_the_cpu_groups_and_leaves_the_model_where_it_was(arch, sequential, start):
    """device="cuda" moves blocks (or, with dense activations, the model) to the
    GPU while pruning, whether the model starts on the CPU or on the GPU: the
    same groups are kept as on the CPU, the pruned model computes the same
    outputs, and every parameter ends where it started."""
    dense = ARCHITECTURES[arch](layers=2)
    tokens = random_tokens(n=8, seq_len=24)
    on_cpu, on_gpu = copy.deepcopy(dense), copy.deepcopy(dense).to(start)
    sparsity = {"heads": 0.5, "neurons": 0.5}
    a = apply(on_cpu, tokens, sparsity, sequential=sequential, progress=False)
    b = apply(on_gpu, tokens, sparsity, sequential=sequential, device="cuda", progress=False)
    assert [s.keep for s in b.sites] == [s.keep for s in a.sites]
    for x, y in zip(a.sites, b.sites):
        assert y.err == pytest.approx(x.err, rel=1e-4, abs=1e-8)
    assert {p.device.type for p in on_gpu.parameters()} == {start}
    x = random_tokens(n=2, seq_len=24, seed=5)
    np.testing.assert_allclose(_out(on_gpu.cpu(), x).numpy(), _out(on_cpu, x).numpy(), atol=1e-4, rtol=1e-3)


def _hook_counts(model):
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_offloaded_runs_the_same_model_and_leaves_no_hooks_behind(arch):
    """`evaluation.offloaded` (a model larger than the GPU, one block there at a
    time) computes what the model computes and removes its hooks on exit, also
    after an error. Where the blocks go is checked on CUDA below."""
    from osscar_opt.placement import offloaded

    model = ARCHITECTURES[arch](layers=2).eval()
    x = random_tokens(n=2, seq_len=24, seed=5)
    before, hooks = _out(model, x), _hook_counts(model)
    with offloaded(model, "cpu"):
        assert _hook_counts(model) != hooks
        during = _out(model, x)
    assert torch.equal(during, before)
    assert _hook_counts(model) == hooks
    with pytest.raises(RuntimeError, match="stop here"):
        with offloaded(model, "cpu"):
            raise RuntimeError("stop here")
    assert _hook_counts(model) == hooks
    assert torch.equal(_out(model, x), before)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_dense_activations_with_offloaded_blocks_keep_the_same_groups(arch):
    """apply(sequential=False, offload=True), the path a model larger than the
    GPU takes with dense activations, prunes what the one whole-model pass
    prunes and leaves no hooks behind."""
    tokens = random_tokens(n=8, seq_len=24)
    whole, blocks = ARCHITECTURES[arch](layers=2), ARCHITECTURES[arch](layers=2)
    hooks = _hook_counts(blocks)
    a = apply(whole, tokens, {"heads": 0.5, "neurons": 0.5}, sequential=False, offload=False, progress=False)
    b = apply(blocks, tokens, {"heads": 0.5, "neurons": 0.5}, sequential=False, offload=True, progress=False)
    assert [s.keep for s in b.sites] == [s.keep for s in a.sites]
    assert [s.err for s in b.sites] == pytest.approx([s.err for s in a.sites], rel=1e-9, abs=1e-12)
    assert _hook_counts(blocks) == hooks
    x = random_tokens(n=2, seq_len=24, seed=5)
    np.testing.assert_allclose(_out(blocks, x).numpy(), _out(whole, x).numpy(), atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_offloaded_holds_one_block_on_the_gpu_at_a_time(arch):
    """Inside `offloaded(model, "cuda")` every block is on the GPU during its
    own forward and on the CPU during the others'; the outputs are the CPU's,
    and everything is back on the CPU afterwards."""
    from osscar_opt.placement import offloaded

    model = ARCHITECTURES[arch](layers=3).eval()
    x = random_tokens(n=2, seq_len=24, seed=5)
    expected = _out(model, x)
    adapter = adapter_for(model)
    blocks = [adapter.block(i) for i in range(adapter.n_layers)]
    seen = []

    def probe(module, args):
        seen.append([next(b.parameters()).device.type for b in blocks])

    with offloaded(model, "cuda"):
        handles = [b.register_forward_pre_hook(probe) for b in blocks]  # after offloaded's own: the block is there
        got = _out(model, x.cuda()).cpu()
        for h in handles:
            h.remove()
    assert seen == [["cuda" if j == i else "cpu" for j in range(len(blocks))] for i in range(len(blocks))]
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4, rtol=1e-3)
    assert {t.device.type for t in list(model.parameters()) + list(model.buffers())} == {"cpu"}


def test_sequential_sees_the_pruned_upstream():
    """Layer 1's instance differs between sequential and dense activations."""
    tokens = random_tokens(n=8, seq_len=24)
    a, b = tiny_llama(), tiny_llama()
    seq = apply(a, tokens, 0.5, structures=["neurons"], sequential=True, progress=False)
    dense = apply(b, tokens, 0.5, structures=["neurons"], sequential=False, progress=False)
    assert seq.sites[0].err == pytest.approx(dense.sites[0].err, rel=1e-9)  # layer 0 sees the same inputs
    assert seq.sites[1].err != pytest.approx(dense.sites[1].err, rel=1e-6)


def _recorded(model, tokens, name, of="input"):
    """Rows of one module's input (or output) over `tokens` (float64), by a plain hook."""
    rows = []

    def keep(x):
        x = x[0] if isinstance(x, (tuple, list)) else x
        rows.append(x.detach().reshape(-1, x.shape[-1]).double())

    module = model.get_submodule(name)
    handle = module.register_forward_pre_hook(lambda m, args: keep(args[0])) if of == "input" else \
        module.register_forward_hook(lambda m, args, out: keep(out))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        handle.remove()
    return torch.cat(rows)


# where each architecture adds a site's output to its residual stream in block 1 (read independently of the adapters)
_RESIDUAL_SUM = {
    ("llama", "heads"): ("model.layers.1.post_attention_layernorm", "input"),
    ("llama", "neurons"): ("model.layers.1", "output"),
    ("bert", "heads"): ("encoder.layer.1.attention.output.LayerNorm", "input"),
    ("bert", "neurons"): ("encoder.layer.1.output.LayerNorm", "input"),
    ("opt", "heads"): ("model.decoder.layers.1.final_layer_norm", "input"),
    ("opt", "neurons"): ("model.decoder.layers.1", "output"),
    ("gpt2", "heads"): ("transformer.h.1.ln_2", "input"),
    ("gpt2", "neurons"): ("transformer.h.1", "output"),
    # parallel residual: x + attn(ln1(x)) + mlp(ln2(x)), both added at the block output
    ("gpt_neox", "heads"): ("gpt_neox.layers.1", "output"),
    ("gpt_neox", "neurons"): ("gpt_neox.layers.1", "output"),
    ("gpt_neox-sequential", "heads"): ("gpt_neox.layers.1.post_attention_layernorm", "input"),
    ("gpt_neox-sequential", "neurons"): ("gpt_neox.layers.1", "output"),
    # Granite adds residual_multiplier x the output (0.5 here)
    ("granite", "heads"): ("model.layers.1.post_attention_layernorm", "input"),
    ("granite", "neurons"): ("model.layers.1", "output"),
    ("stablelm-parallel", "heads"): ("model.layers.1", "output"),
    ("stablelm-parallel", "neurons"): ("model.layers.1", "output"),
    ("cohere", "heads"): ("model.layers.1", "output"),  # parallel: one input norm, no post-attention norm
    ("cohere", "neurons"): ("model.layers.1", "output"),
    ("phi", "heads"): ("model.layers.1", "output"),  # parallel
    ("phi", "neurons"): ("model.layers.1", "output"),
    ("starcoder2", "heads"): ("model.layers.1.post_attention_layernorm", "input"),
    ("starcoder2", "neurons"): ("model.layers.1", "output"),
}


@pytest.mark.parametrize("arch,structure", sorted(_RESIDUAL_SUM))
def test_dense_targets_fit_the_dense_residual_stream(arch, structure):
    """targets='dense': layer 1's refit makes the gap between the dense and
    the pruned model's residual sum after the site (e.g. Llama's block
    output after its FFN, the input of BERT's output LayerNorm) orthogonal
    to the kept inputs (the least-squares optimality condition, damping ~ 0),
    checked on states recorded here by plain hooks. Solved exactly
    (`enumerate`), so the gap is the smallest over every support and the
    default mode's is larger. Layer 0 sees the same inputs in both models, so
    its instance is the default mode's."""
    from small_models import tiny_gpt_neox, tiny_llama_like

    if arch == "gpt_neox-sequential":
        dense = tiny_gpt_neox(layers=2, ffn=16, parallel=False)
    elif arch in ("granite", "cohere", "phi", "starcoder2"):
        dense = tiny_llama_like(arch, ffn=16)
    elif arch == "stablelm-parallel":
        dense = tiny_llama_like("stablelm", ffn=16, use_parallel_residual=True)
    else:
        dense = ARCHITECTURES[arch](layers=2, ffn=16)
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    tokens = random_tokens(n=8, seq_len=24)
    kw = dict(structures=[structure], damping=1e-8, solver="enumerate", progress=False)
    fit_dense = apply(a, tokens, 0.5, targets="dense", target_damping=1e-8, **kw)
    fit_layer = apply(b, tokens, 0.5, targets="layer", **kw)
    assert fit_dense.sites[0].keep == fit_layer.sites[0].keep
    assert fit_dense.sites[0].err == pytest.approx(fit_layer.sites[0].err, rel=1e-6)
    consumer = fit_dense.sites[1].module
    point, of = _RESIDUAL_SUM[arch, structure]
    R = _recorded(dense, tokens, point, of=of)
    gap_dense, gap_layer = R - _recorded(a, tokens, point, of=of), R - _recorded(b, tokens, point, of=of)
    X = _recorded(a, tokens, consumer)  # the kept inputs only: the model is physically pruned
    assert torch.linalg.norm(X.T @ gap_dense) <= 1e-4 * torch.linalg.norm(X) * torch.linalg.norm(gap_dense)
    assert torch.linalg.norm(X.T @ gap_layer) > 1e-2 * torch.linalg.norm(X) * torch.linalg.norm(gap_layer)
    assert torch.linalg.norm(gap_dense) < torch.linalg.norm(gap_layer)


def test_targets_none_picks_dense_where_it_applies():
    tokens = random_tokens(n=4, seq_len=16)
    kw = dict(structures=["neurons"], targets=None, progress=False)
    report = apply(tiny_llama(), tokens, 0.5, **kw)
    assert report.targets == "dense" and report.target_damping is None  # ridge and shrinkage validated per site
    for site in report.sites:
        assert site.target_fit["ridge"] in CORRECTION_RIDGES and 0.0 <= site.target_fit["shrink"] <= 1.0
    assert "validated ridge and shrinkage" in report.to_markdown()
    assert apply(tiny_llama(), tokens, 0.5, sequential=False, **kw).targets == "layer"


def test_per_structure_and_per_layer_sparsity():
    model = tiny_llama(layers=2)
    report = apply(model, random_tokens(), {0: 0.5}, structures=["neurons"], progress=False)
    assert [(s.layer, s.kept) for s in report.sites] == [(0, 48)]
    assert model.model.layers[1].mlp.down_proj.in_features == 96


def test_cnn_trained_on_digits_keeps_its_accuracy():
    model, images, labels = digits_cnn()
    from osscar_opt.evaluation import accuracy

    before = accuracy(model, images, labels)
    params = count_parameters(model)
    report = apply(model, images[:200], 0.25, progress=False)
    after = accuracy(model, images, labels)
    assert [s.module for s in report.sites] == ["conv2", "conv3"]
    assert report.targets == "layer"
    assert count_parameters(model) < params
    assert before > 0.9 and after > before - 0.1, (before, after)


@pytest.mark.parametrize("kind,structure", [("stablelm", "heads"), ("stablelm", "kv-groups"), ("olmo2", "heads")])
def test_head_norms_across_heads_refuse_head_removal_before_any_change(kind, structure):
    """StableLM with qk_layernorm normalizes every head with its own LayerNorm
    (a list of them per layer), OLMo2 all heads together: removing heads would
    change what the kept heads' norms compute, so head removal is refused
    before any layer changes, with the way out (neurons only), which then
    works (OLMo2 with layer targets: its sandwich norms) and is what these
    models prune by default."""
    from small_models import tiny_llama_like

    from osscar_opt.surgery import SurgeryError

    dense = tiny_llama_like(kind, **({"qk_layernorm": True} if kind == "stablelm" else {}))
    model = copy.deepcopy(dense)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = random_tokens(n=4, seq_len=24)
    with pytest.raises(SurgeryError, match=r"self_attn.q_(layer)?norm has parameters per head or across heads.*"
                                           r"structures=\['neurons'\]"):
        apply(model, tokens, {structure: 0.5, "neurons": 0.5}, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    report = apply(model, tokens, 0.5, progress=False)  # the default structures: neurons alone here
    assert adapter_for(model).default_structures == ("neurons",)
    assert [(s.structure, s.kept) for s in report.sites] == [("neurons", 48), ("neurons", 48)]
    assert report.targets == ("layer" if kind == "olmo2" else "dense")
    x = random_tokens(n=2, seq_len=24, seed=5)
    np.testing.assert_allclose(_out(model, x).numpy(), _out(_refit_reference(dense, model, report), x).numpy(),
                               atol=2e-5, rtol=1e-4)


def test_bad_inputs_leave_the_model_untouched():
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = random_tokens()
    for bad, error, match in [
        (dict(sparsity=1.0), PruneError, r"\[0, 1\)"),
        (dict(sparsity=-0.1), PruneError, r"\[0, 1\)"),
        (dict(sparsity=0.5, structures=["channels"]), UnsupportedModelError, "no structure 'channels'"),
        (dict(sparsity=0.5, structures=["heads", "kv-groups"]), PruneError, "one of 'heads', 'kv-groups'"),
        (dict(sparsity=0.5, structures=["query-heads", "heads"]), PruneError, "one of 'heads', 'query-heads'"),
        (dict(sparsity=0.5, layers=[7]), UnsupportedModelError, "out of range"),
        (dict(sparsity=0.5, damping=-0.01), InstanceError, "damping must be a finite number >= 0"),
        (dict(sparsity=0.5, damping=float("nan")), InstanceError, "damping must be a finite number >= 0"),
        (dict(sparsity=0.5, damping=True), InstanceError, "damping must be a finite number >= 0"),
        (dict(sparsity=0.5, targets="outputs"), PruneError, "targets must be one of 'layer', 'dense'"),
        (dict(sparsity=0.5, targets="dense", sequential=False), PruneError, "targets='dense' needs sequential"),
        (dict(sparsity={"channels": 0.5}), UnsupportedModelError, "no structure 'channels'"),
        (dict(sparsity={9: 0.5}), UnsupportedModelError, "layer 9 is out of range"),
        (dict(sparsity={(0, "filters"): 0.5}), UnsupportedModelError, "no structure 'filters'"),
        (dict(sparsity=0.5, solver="no-such-solver"), oo.SolverError, "unknown solver 'no-such-solver'"),
        (dict(sparsity=0.5, swap_sz=4), oo.SolverError, "no parameter 'swap_sz'"),
        (dict(sparsity=0.5, solver="magnitude", device="cuda:0"), oo.SolverError, "device 'cuda:0'"),
        (dict(sparsity={"neurons": {"heads": 0.5}}), PruneError, "must pair a structure with layer indices"),
        (dict(sparsity={"neurons": {0: 1.5}}), PruneError, r"\[0, 1\)"),
        (dict(sparsity={"neurons": {5: 0.5}}), UnsupportedModelError, "layer 5 is out of range"),
        (dict(sparsity=0.5, structures="channels"), UnsupportedModelError, "no structure 'channels'"),
        # a solver's size limit is met before the first layer is pruned, not at the first large layer
        (dict(sparsity=0.5, solver="bnb", max_groups=64), PruneError,
         r"solver 'bnb' cannot take layer 0 neurons \(96 groups exceed max_groups=64\)"),
        (dict(sparsity=0.5, solver="enumerate"), PruneError,
         r"solver 'enumerate' cannot take layer 0 neurons \(about 10\^27 supports exceed max_supports"),
    ]:
        with pytest.raises(error, match=match):
            apply(model, tokens, progress=False, **bad)
    with pytest.raises(DataError, match="empty"):
        apply(model, torch.zeros(0, 16, dtype=torch.long), 0.5, progress=False)
    for calibration, match in [(tokens.float(), "must be integers, got torch.float32"),
                               (tokens[None], r"shape \(windows, seq_len\), got \(1, 6, 32\)"),
                               (tokens + 128, "token id 255 lies outside the model's vocabulary \\(0..127\\)"),
                               (tokens - 200, "token id -200 lies outside"),
                               ("some text", "calibration is a string, not token ids"),
                               ([[1, 2, 3], [4, 5]], "must all have the same length"),
                               (np.array([["a", "b"]]), "holds no token ids"),
                               (np.ones((2, 32), bool), "dtype bool holds no token ids")]:
        with pytest.raises(DataError, match=match):
            apply(model, calibration, 0.5, progress=False)
    tied = tiny_llama()
    tied.model.layers[1].mlp.up_proj.weight = tied.model.layers[0].mlp.up_proj.weight  # shared weight
    tied_state = {k: v.clone() for k, v in tied.state_dict().items()}
    with pytest.raises(oo.OsscarError, match="shared"):
        apply(tied, tokens, 0.5, structures=["neurons"], progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for k, v in tied.state_dict().items():
        assert torch.equal(v, tied_state[k]), k


def test_sparsity_structures_and_token_ids_in_their_other_documented_forms():
    """A nested per-layer sparsity prunes as its (layer, structure) form; token ids as a numpy
    array or nested lists calibrate as the tensor does; one structure may be a plain string."""
    tokens = random_tokens()
    results = []
    for sparsity, calibration, structures in [
        ({(0, "neurons"): 0.5, (1, "neurons"): 0.25}, tokens, ["neurons"]),
        ({"neurons": {0: 0.5, 1: 0.25}}, tokens.numpy().astype(np.int32), "neurons"),
        ({0: {"neurons": 0.5}, 1: {"neurons": 0.25}}, tokens.tolist(), None),
    ]:
        model = tiny_llama()
        report = apply(model, calibration, sparsity, structures=structures, progress=False)
        kept = {(r.layer, r.structure): r.keep for r in report.sites}
        results.append((kept, [p.detach().clone() for p in model.parameters()]))
    kept0, params0 = results[0]
    assert {k: len(v) for k, v in kept0.items()} == {(0, "neurons"): 48, (1, "neurons"): 72}
    for kept, params in results[1:]:
        assert kept == kept0
        assert all(torch.equal(a, b) for a, b in zip(params, params0))


def test_the_package_exposes_the_model_driver_as_documented(tmp_path):
    """`osscar_opt.apply` is the function (not its submodule), as the README's
    `from osscar_opt import apply, data, models` uses it, with evaluate_model and
    save_pruned / load_pruned beside it."""
    import osscar_opt.apply as _submodule_import  # noqa: F401  (the name must stay the function)
    from osscar_opt import apply as apply_fn

    assert apply_fn is apply and oo.apply is apply
    assert callable(oo.evaluate_model) and oo.save_pruned is save_pruned and oo.load_pruned is load_pruned
    model, x = tiny_llama(), random_tokens()
    dense = count_parameters(model)
    report = oo.apply(model, x, 0.5, structures=["neurons"])
    assert isinstance(report, oo.PruneReport) and report.params_after < dense == report.params_before
    assert report.params_after == count_parameters(model)
    back = oo.load_pruned(oo.save_pruned(model, None, tmp_path / "m"))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, back(x).logits, atol=1e-5)


def test_kl_divergence_is_zero_for_the_same_model_and_matches_torch_kl_div():
    """The calibration-KL criterion of bench-supports: KL(dense || pruned) of
    the next-token distributions, here against torch's own kl_div."""
    from osscar_opt.evaluation import kl_divergence

    dense = tiny_llama()
    tokens = random_tokens(3, 16, seed=4)
    assert kl_divergence(dense, dense, tokens) == pytest.approx(0.0, abs=1e-12)
    pruned = copy.deepcopy(dense)
    apply(pruned, random_tokens(8, 16, seed=5), 0.5, solver="obs-greedy", progress=False)
    with torch.no_grad():
        p = torch.log_softmax(dense(input_ids=tokens).logits[:, :-1].double(), dim=-1)
        q = torch.log_softmax(pruned(input_ids=tokens).logits[:, :-1].double(), dim=-1)
    expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum").item() / (3 * 15)
    got = kl_divergence(dense, pruned, tokens, batch_size=2)
    assert got > 0.0 and got == pytest.approx(expected, rel=1e-3)  # float32 logits against float64


def test_the_next_token_loss_leaves_padding_out_and_is_what_perplexity_averages():
    """The one next-token loss of perplexity() and the held-out check: each
    position scores the token after it, a position whose next token is padding
    is left out, half-precision logits are scored in float32; perplexity is
    exp of its mean over every position, in any batching."""
    from osscar_opt.evaluation import next_token_loss_sum, perplexity

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen)
    ids = torch.randint(0, 11, (2, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    by_hand = [-torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]] for b in range(2) for t in range(4)
               if mask[b, t + 1]]
    loss, n = next_token_loss_sum(logits, ids, mask)
    assert n == 6 and loss.item() == pytest.approx(float(sum(by_hand)), rel=1e-6)
    half, n_half = next_token_loss_sum(logits.half(), ids, mask)
    assert half.dtype == torch.float32 and n_half == 6 and half.item() == pytest.approx(loss.item(), rel=1e-2)

    model = tiny_llama()
    tokens = random_tokens(3, 16, seed=4)
    with torch.no_grad():
        total, count = next_token_loss_sum(model(input_ids=tokens).logits, tokens)
    assert count == 3 * 15
    for batch in (1, 2, None):
        assert perplexity(model, tokens, batch_size=batch) == pytest.approx(math.exp(total.item() / count), rel=1e-5)


def test_compare_runs_other_solvers_on_every_site_and_writes_only_the_solvers_support():
    """apply(compare=...): the exact enumeration and magnitude also solve each
    site's instance (sequential inputs, dense targets); the model written is
    the one the solver alone would give, and the exact err is never above it."""
    from osscar_opt.errors import SolverError

    cal = random_tokens(8, 16, seed=1)
    alone, compared = tiny_llama(), tiny_llama()
    ra = apply(alone, cal, 0.5, solver="obs-greedy", structures=("heads",), progress=False)
    rb = apply(compared, cal, 0.5, solver="obs-greedy", structures=("heads",), progress=False,
               compare=("enumerate", "magnitude"))
    assert [s.keep for s in ra.sites] == [s.keep for s in rb.sites]
    assert all(torch.equal(v, compared.state_dict()[k]) for k, v in alone.state_dict().items())
    assert all(s.compare is None for s in ra.sites) and not ra.comparison
    for s in rb.sites:
        assert set(s.compare) == {"enumerate", "magnitude"}
        assert s.compare["enumerate"] <= s.err * (1 + 1e-9)  # the exact optimum of the same instance
    counts = rb.comparison
    assert counts["enumerate"]["lower"] == 0 and counts["enumerate"]["failed"] == 0
    assert sum(counts["magnitude"].values()) == len(rb.sites) == 2
    text = rb.to_markdown()
    assert "err of enumerate |" in text and "against `magnitude` on the same instances" in text
    assert rb.to_dict()["comparison"] == counts
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SolverError, match="nope"):
        apply(model, cal, 0.5, structures=("heads",), progress=False, compare=("nope",))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_layers_site_takes_its_own_solver_and_default_covers_the_rest():
    """solver="default=obs-greedy+heads[0]=magnitude": layer 0's heads are
    solved by magnitude, every other site by obs-greedy (each site's err is
    its own solver's on the same instance); the mapping form with a
    (layer, structure) key writes the same model; keys naming a layer or a
    site the call does not prune, or leaving a site without a solver, are
    refused with the model untouched."""
    cal = random_tokens(8, 16, seed=2)
    model = tiny_llama()
    report = apply(model, cal, 0.5, solver="default=obs-greedy+heads[0]=magnitude", progress=False,
                   compare=("obs-greedy", "magnitude"), select="err")
    assert report.solver == "default=obs-greedy+heads[0]=magnitude"
    assert len(report.sites) == 4
    for s in report.sites:
        own = "magnitude" if (s.layer, s.structure) == (0, "heads") else "obs-greedy"
        assert s.err == pytest.approx(s.compare[own], rel=1e-9, abs=1e-12), (s.layer, s.structure)
    first = report.sites[0]
    assert (first.layer, first.structure) == (0, "heads") and first.compare["obs-greedy"] < first.err - 1e-9
    same = tiny_llama()
    apply(same, cal, 0.5, solver={(0, "heads"): "magnitude", "default": "obs-greedy"}, progress=False, select="err")
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in model.state_dict().items())
    untouched = tiny_llama()
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    bad = [("default=osscar+heads[7]=magnitude", {}, "layer 7"),
           ("heads[0]=magnitude+neurons=osscar", {}, "no solver for 'heads' (layer 1)"),
           ("default=osscar+heads[0]=magnitude", {"layers": [1]}, "names 'heads[0]', which this call does not prune"),
           ("default=osscar+heads[0]=magnitude", {"structures": ("neurons",)}, "does not prune"),
           ("default=osscar+heads[x]=magnitude", {}, "STRUCTURE[LAYER]")]
    for solver, kwargs, message in bad:
        with pytest.raises(OsscarError, match=re.escape(message)):
            apply(untouched, cal, 0.5, solver=solver, progress=False, **kwargs)
        assert all(torch.equal(before[k], v) for k, v in untouched.state_dict().items()), solver


def test_a_solver_per_structure_solves_each_structure_with_its_own_and_refuses_gaps_before_any_change():
    """solver={"heads": ..., "neurons": ...}: every site's err is the err its own
    solver reaches on the same instance (compare= runs both there), the string
    form gives the same model, each solver gets only the parameters it has,
    and a mapping that misses, adds or misspells a structure is refused with
    the model untouched."""
    from osscar_opt.errors import SolverError

    cal = random_tokens(8, 16, seed=2)
    mixed = tiny_llama()  # select="err": every site keeps its solver's support
    report = apply(mixed, cal, 0.5, solver={"heads": "obs-greedy", "neurons": "magnitude"}, progress=False,
                   compare=("obs-greedy", "magnitude"), select="err")
    assert report.solver == "heads=obs-greedy+neurons=magnitude"
    assert {s.structure for s in report.sites} == {"heads", "neurons"}
    for s in report.sites:
        own = "obs-greedy" if s.structure == "heads" else "magnitude"
        assert s.err == pytest.approx(s.compare[own], rel=1e-9, abs=1e-12), (s.layer, s.structure)
    # the mapping mattered: magnitude's neurons are worse than obs-greedy's somewhere
    assert any(s.compare["obs-greedy"] < s.err - 1e-9 for s in report.sites if s.structure == "neurons")
    written = tiny_llama()
    apply(written, cal, 0.5, solver="heads=obs-greedy+neurons=magnitude", progress=False, select="err")
    assert all(torch.equal(v, written.state_dict()[k]) for k, v in mixed.state_dict().items())
    # local_search only osscar has (its heads then stay greedy), dtype both have: the same as two plain runs
    split = tiny_llama()
    rs = apply(split, cal, 0.5, solver={"heads": "osscar", "neurons": "obs-greedy"}, progress=False,
               local_search=False, dtype="float64", select="err")
    assert rs.solver_params == {"local_search": False, "dtype": "float64"}
    plain = apply(tiny_llama(), cal, 0.5, solver="obs-greedy", progress=False, select="err")
    assert [s.keep for s in rs.sites if s.structure == "neurons"] == \
        [s.keep for s in plain.sites if s.structure == "neurons"]
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [({"heads": "osscar"}, PruneError, "no solver for 'neurons'"),
           ({"heads": "osscar", "neurons": "osscar", "kv-groups": "osscar"}, PruneError, "does not prune"),
           ({"heads": "osscar", "neuron": "osscar"}, OsscarError, "neuron"),
           ("heads=osscar+neurons", PruneError, "STRUCTURE=SOLVER"),
           ({"heads": "osscar", "neurons": "nope"}, SolverError, "nope"),
           (["osscar"], PruneError, "mapping"),
           ({"heads": "osscar", "neurons": "obs-greedy"}, SolverError, "swap_sized")]
    for solver, error, message in bad:
        params = {"swap_sized": 4} if message == "swap_sized" else {}
        with pytest.raises(error, match=re.escape(message)):
            apply(model, cal, 0.5, solver=solver, progress=False, **params)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), solver
