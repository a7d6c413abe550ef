"""Physical removal of pruned groups (osscar_opt.surgery).

The reference for every removal is built here, independently of the surgery
code: the dense model with the removed groups' consumer input rows zeroed
(or with the consumer weight replaced by the refit weights). A pruned model
must compute the same function, have the shapes and config that say so,
and survive save/load.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from osscar_opt.adapters import adapter_for
from osscar_opt.surgery import (
    SurgeryError,
    load_pruned,
    pruner_for,
    remove_groups,
    save_pruned,
)

from small_models import SmallCNN, digits_cnn, random_tokens, tiny_bert, tiny_gpt2, tiny_llama, tiny_opt


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: extra threads only contend on the shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cnn():
    """SmallCNN with non-trivial BatchNorm statistics, so that slicing them matters."""
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    return model.eval()


BUILDERS = {
    ("llama", "heads"): lambda: tiny_llama(heads=6, kv_heads=2, hidden=96),  # 3 query heads per KV group
    ("llama", "kv-groups"): lambda: tiny_llama(heads=6, kv_heads=3, hidden=96),
    ("llama", "neurons"): tiny_llama,
    ("bert", "heads"): tiny_bert,
    ("bert", "neurons"): tiny_bert,
    ("opt", "heads"): tiny_opt,
    ("opt", "neurons"): tiny_opt,
    ("gpt2", "heads"): tiny_gpt2,
    ("gpt2", "neurons"): tiny_gpt2,
    ("conv", "channels"): small_cnn,
}
CASES = sorted(BUILDERS)
HF_CASES = [c for c in CASES if c[0] != "conv"]


def inputs(arch):
    if arch == "conv":
        return torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return random_tokens(n=3, seq_len=12)


def outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out[0]  # logits / last_hidden_state


def keep_for(site, layer, uniform):
    """Kept groups: fewer in layer 0 than in layer 1 unless uniform; GQA-balanced."""
    rng = np.random.default_rng(10 + layer)
    if site.partition is not None:
        parts = np.asarray(site.partition)
        per = 1 if uniform or layer == 0 else 2
        return np.sort(np.concatenate([rng.choice(np.flatnonzero(parts == g), per, replace=False)
                                       for g in np.unique(parts)]))
    p = site.n_groups
    k = p // 2 if uniform or layer == 0 else (3 * p) // 4
    return np.sort(rng.choice(p, k, replace=False))


def zero_inputs(module, groups, group_size):
    """Independent reference: zero the consumer's input rows of `groups`."""
    rows = (np.asarray(groups)[:, None] * group_size + np.arange(group_size)).ravel()
    with torch.no_grad():
        if isinstance(module, nn.Conv2d):
            module.weight[:, torch.as_tensor(groups)] = 0.0
        elif isinstance(module, nn.Linear):
            module.weight[:, torch.as_tensor(rows)] = 0.0
        else:  # transformers Conv1D: weight (in, out)
            module.weight[torch.as_tensor(rows), :] = 0.0


def write_dense(module, W):
    """Independent reference: the consumer's weight replaced by W (d x m, rows = inputs)."""
    W = torch.as_tensor(W, dtype=module.weight.dtype)
    with torch.no_grad():
        if isinstance(module, nn.Conv2d):
            module.weight.copy_(W.T.reshape(module.weight.shape))
        elif isinstance(module, nn.Linear):
            module.weight.copy_(W.T)
        else:
            module.weight.copy_(W)


def expected_shapes(arch, structure, prefix, k, model):
    """Parameter shapes after keeping k groups at one site (k_prev: see conv)."""
    if arch == "llama":
        hidden, hd = model.config.hidden_size, 16
        attn = f"{prefix}.self_attn"
        if structure == "heads":
            return {f"{attn}.q_proj.weight": (k * hd, hidden), f"{attn}.o_proj.weight": (hidden, k * hd),
                    f"{attn}.k_proj.weight": (2 * hd, hidden), f"{attn}.v_proj.weight": (2 * hd, hidden)}
        if structure == "kv-groups":
            return {f"{attn}.q_proj.weight": (k * 2 * hd, hidden), f"{attn}.o_proj.weight": (hidden, k * 2 * hd),
                    f"{attn}.k_proj.weight": (k * hd, hidden), f"{attn}.v_proj.weight": (k * hd, hidden)}
        mlp = f"{prefix}.mlp"
        return {f"{mlp}.gate_proj.weight": (k, hidden), f"{mlp}.up_proj.weight": (k, hidden),
                f"{mlp}.down_proj.weight": (hidden, k)}
    hidden, hd = 48, 12
    if arch == "bert":
        if structure == "heads":
            sa = f"{prefix}.attention.self"
            return {f"{sa}.query.weight": (k * hd, hidden), f"{sa}.key.weight": (k * hd, hidden),
                    f"{sa}.value.weight": (k * hd, hidden), f"{sa}.value.bias": (k * hd,),
                    f"{prefix}.attention.output.dense.weight": (hidden, k * hd),
                    f"{prefix}.attention.output.dense.bias": (hidden,)}
        return {f"{prefix}.intermediate.dense.weight": (k, hidden), f"{prefix}.intermediate.dense.bias": (k,),
                f"{prefix}.output.dense.weight": (hidden, k)}
    if arch == "opt":
        if structure == "heads":
            at = f"{prefix}.self_attn"
            return {f"{at}.q_proj.weight": (k * hd, hidden), f"{at}.k_proj.weight": (k * hd, hidden),
                    f"{at}.v_proj.weight": (k * hd, hidden), f"{at}.k_proj.bias": (k * hd,),
                    f"{at}.out_proj.weight": (hidden, k * hd)}
        return {f"{prefix}.fc1.weight": (k, hidden), f"{prefix}.fc1.bias": (k,), f"{prefix}.fc2.weight": (hidden, k)}
    if arch == "gpt2":
        if structure == "heads":
            return {f"{prefix}.attn.c_attn.weight": (hidden, 3 * k * hd), f"{prefix}.attn.c_attn.bias": (3 * k * hd,),
                    f"{prefix}.attn.c_proj.weight": (k * hd, hidden)}
        return {f"{prefix}.mlp.c_fc.weight": (hidden, k), f"{prefix}.mlp.c_fc.bias": (k,),
                f"{prefix}.mlp.c_proj.weight": (k, hidden)}
    # conv: layer 0 = conv1 -> bn1 -> conv2, layer 1 = conv2 -> bn2 -> (pool) -> conv3
    producer, bn, consumer = ("conv1", "bn1", "conv2") if prefix == "conv2" else ("conv2", "bn2", "conv3")
    out = model.get_submodule(consumer).out_channels
    return {f"{producer}.weight": (k, model.get_submodule(producer).in_channels, 3, 3), f"{producer}.bias": (k,),
            f"{bn}.weight": (k,), f"{bn}.running_mean": (k,), f"{bn}.running_var": (k,),
            f"{consumer}.weight": (out, k, 3, 3)}


def attention_attributes(arch, structure, model, prefix, k):
    """The attributes forward reshapes with, as the installed transformers reads them."""
    if structure == "neurons" or arch == "conv":
        return
    if arch == "llama":
        attn = model.get_submodule(f"{prefix}.self_attn")
        kv = attn.k_proj.out_features // attn.head_dim
        assert attn.num_key_value_groups == attn.q_proj.out_features // attn.head_dim // kv
    elif arch == "bert":
        sa = model.get_submodule(f"{prefix}.attention.self")
        assert (sa.num_attention_heads, sa.all_head_size) == (k, k * 12)
    elif arch == "opt":
        assert model.get_submodule(f"{prefix}.self_attn").num_heads == k
    elif arch == "gpt2":
        attn = model.get_submodule(f"{prefix}.attn")
        assert (attn.num_heads, attn.split_size) == (k, k * 12)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].shape == value.shape and torch.equal(after[key], value), key


def n_params(model):
    return sum(p.numel() for p in model.parameters())


SIZE_KEY = {"heads": "heads", "kv-groups": "kv_heads", "neurons": "neurons", "channels": "channels"}
AUTO = {"llama": "AutoModelForCausalLM", "opt": "AutoModelForCausalLM", "gpt2": "AutoModelForCausalLM",
        "bert": "AutoModel"}


def prune_all_layers(model, structure, uniform, dense=None):
    adapter = adapter_for(model)
    kept = []
    for layer in range(adapter.n_layers):
        site = adapter.site(structure, layer)
        keep = keep_for(site, layer, uniform)
        if dense is not None:
            zero_inputs(dense.get_submodule(site.consumer), np.setdiff1d(np.arange(site.n_groups), keep),
                        site.group_size)
        remove_groups(model, site, keep)
        kept.append(keep)
    return kept


# ----------------------------------------------------------------- the tests
@pytest.mark.parametrize("arch,structure", CASES)
def test_removal_equals_the_zeroed_dense_model_and_reloads(arch, structure, tmp_path):
    model = BUILDERS[arch, structure]()
    dense = copy.deepcopy(model)
    x = inputs(arch)
    before = n_params(model)
    kept = prune_all_layers(model, structure, uniform=False, dense=dense)
    adapter = adapter_for(model)
    for layer, keep in enumerate(kept):
        prefix = adapter.block_name(layer)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for name, shape in expected_shapes(arch, structure, prefix, keep.size, model).items():
            assert shapes[name] == shape, name
        attention_attributes(arch, structure, model, prefix, keep.size)
        if arch != "conv":
            assert model.config.osscar_layer_sizes[layer][SIZE_KEY[structure]] == keep.size
    assert n_params(model) < before
    expected = outputs(dense, x)
    got = outputs(model, x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # layers differ: save_pruned -> load_pruned reloads, plain from_pretrained refuses
    path = save_pruned(model, None, tmp_path / "pruned")
    fresh = tiny_bert() if arch == "bert" else SmallCNN() if arch == "conv" else None
    loaded = load_pruned(path, model=fresh)
    torch.testing.assert_close(outputs(loaded, x), got, rtol=0, atol=0)
    if arch != "conv":
        assert "load_pruned" in model.config.osscar_note
        import transformers

        with pytest.raises(RuntimeError, match="mismatch"):
            getattr(transformers, AUTO[arch]).from_pretrained(path)
    with pytest.raises(SurgeryError, match="already exists.*overwrite=True"):
        save_pruned(model, None, path)
    save_pruned(model, None, path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no temporary folders left behind


@pytest.mark.parametrize("arch,structure", CASES)
def test_refit_weights_become_the_consumer_weight(arch, structure):
    model = BUILDERS[arch, structure]()
    adapter = adapter_for(model)
    site = adapter.site(structure, 1)
    keep = keep_for(site, 1, uniform=True)
    consumer = model.get_submodule(site.consumer)
    bias = None if consumer.bias is None else consumer.bias.detach().clone()
    reference = (consumer.weight.detach().T if isinstance(consumer, nn.Linear) else
                 consumer.weight.detach() if not isinstance(consumer, nn.Conv2d) else
                 consumer.weight.detach().reshape(consumer.out_channels, -1).T)
    rng = np.random.default_rng(3)
    W = rng.standard_normal(tuple(reference.shape)) * float(reference.std())
    rows = (keep[:, None] * site.group_size + np.arange(site.group_size)).ravel()
    mask = np.zeros(W.shape[0], bool)
    mask[rows] = True
    W[~mask] = 0.0
    dense = copy.deepcopy(model)
    write_dense(dense.get_submodule(site.consumer), W)
    remove_groups(model, site, keep, W)
    x = inputs(arch)
    torch.testing.assert_close(outputs(model, x), outputs(dense, x), rtol=1e-5, atol=1e-5)
    new = model.get_submodule(site.consumer)
    if bias is not None:
        assert torch.equal(new.bias, bias)
    assert new.weight.dtype == torch.float32


@pytest.mark.parametrize("arch,structure", HF_CASES)
def test_uniform_pruning_rewrites_the_standard_config(arch, structure, tmp_path):
    import transformers

    model = BUILDERS[arch, structure]()
    config_before = model.config.to_dict()
    kept = prune_all_layers(model, structure, uniform=True)
    k = kept[0].size
    config = model.config
    x = inputs(arch)
    expressible = arch == "llama" or structure == "neurons"
    if arch == "llama" and structure == "heads":
        assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (k, 2, 16)
    elif arch == "llama" and structure == "kv-groups":
        assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2 * k, k, 16)
    elif structure == "neurons":
        field = {"llama": "intermediate_size", "bert": "intermediate_size", "opt": "ffn_dim", "gpt2": "n_inner"}[arch]
        assert getattr(config, field) == k
    else:  # BERT/OPT/GPT-2 heads: head size = hidden / num_attention_heads, not rewritable
        assert config.num_attention_heads == config_before.get("num_attention_heads", config_before.get("n_head"))
    assert hasattr(config, "osscar_note") != expressible
    path = save_pruned(model, None, tmp_path / "pruned")
    auto = getattr(transformers, AUTO[arch])
    if expressible:
        plain = auto.from_pretrained(path).eval()
        torch.testing.assert_close(outputs(plain, x), outputs(model, x), rtol=0, atol=0)
    else:
        with pytest.raises(RuntimeError, match="mismatch"):
            auto.from_pretrained(path)
    loaded = load_pruned(path, model=tiny_bert() if arch == "bert" else None)
    torch.testing.assert_close(outputs(loaded, x), outputs(model, x), rtol=0, atol=0)


def test_llama_heads_the_config_class_rejects_need_load_pruned(tmp_path):
    """LlamaConfig requires hidden_size % num_attention_heads == 0: 4 heads of a
    hidden size 30 model stay in osscar_layer_sizes, not the standard fields."""
    import transformers

    model = tiny_llama(heads=6, kv_heads=2, hidden=30)
    adapter = adapter_for(model)
    for layer in range(adapter.n_layers):
        remove_groups(model, adapter.site("heads", layer), [0, 1, 3, 4])  # 2 of 3 heads per KV group
    assert model.config.num_attention_heads == 6 and "load_pruned" in model.config.osscar_note
    assert [s["heads"] for s in model.config.osscar_layer_sizes] == [4, 4]
    x = inputs("llama")
    path = save_pruned(model, None, tmp_path / "pruned")
    with pytest.raises(RuntimeError, match="mismatch"):
        transformers.AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(outputs(load_pruned(path), x), outputs(model, x), rtol=0, atol=0)


def test_llama_kv_groups_then_heads_in_one_layer(tmp_path):
    """Two removals at one layer, each with a fresh site, compose; load_pruned redoes both."""
    model = tiny_llama(heads=6, kv_heads=3, hidden=96)  # 2 query heads per KV group
    dense = copy.deepcopy(model)
    adapter = adapter_for(model)
    remove_groups(model, adapter.site("kv-groups", 0), [0, 2])  # query heads 0, 1, 4, 5 remain
    site = adapter.site("heads", 0)
    assert site.n_groups == 4 and site.partition == (0, 0, 1, 1)
    remove_groups(model, site, [1, 2])  # original heads 1 and 4
    zero_inputs(dense.model.layers[0].self_attn.o_proj, np.array([0, 2, 3, 5]), 16)
    x = inputs("llama")
    torch.testing.assert_close(outputs(model, x), outputs(dense, x), rtol=1e-5, atol=1e-5)
    assert model.config.osscar_layer_sizes[0] == {"heads": 2, "kv_heads": 2, "neurons": 96}
    loaded = load_pruned(save_pruned(model, None, tmp_path / "pruned"))
    torch.testing.assert_close(outputs(loaded, x), outputs(model, x), rtol=0, atol=0)


def test_bad_inputs_are_clear_errors_and_leave_the_model_untouched():
    model = tiny_llama(heads=6, kv_heads=2, hidden=96)
    adapter = adapter_for(model)
    heads = adapter.site("heads", 0)
    neurons = adapter.site("neurons", 0)
    d, m = 96, 96
    W_outside = np.ones((d, m))
    before = snapshot(model)
    groups_before = model.model.layers[0].self_attn.num_key_value_groups
    cases = [
        (heads, [0, 7], None, "out of range: this site has groups 0..5"),
        (heads, [0, 0, 3], None, "repeated group ids"),
        (heads, [0, 1, 3], None, r"per KV group are \[2, 1\].*same number"),
        (heads, [], None, "keep at least one group"),
        (heads, np.array([0.0, 3.0]), None, "integer group ids"),
        (heads, [0, 3], np.ones((5, m)), r"shape \(5, 96\), expected \(96, 96\)"),
        (heads, [0, 3], W_outside, "nonzero on rows of removed groups"),
        (heads, [0, 3], np.full((d, m), np.nan), "NaN"),
        (neurons, np.ones(5, bool), None, "boolean keep mask must have 96 entries"),
    ]
    for site, keep, weights, message in cases:
        with pytest.raises(SurgeryError, match=message):
            remove_groups(model, site, keep, weights)
    assert_unchanged(model, before)
    assert model.model.layers[0].self_attn.num_key_value_groups == groups_before

    # a stale site (taken before an earlier removal) is refused
    remove_groups(model, heads, [0, 3])
    before = snapshot(model)
    with pytest.raises(SurgeryError, match="stale.*6 groups.*now has 2"):
        remove_groups(model, heads, [0, 3])
    assert_unchanged(model, before)

    # a producer shared with another layer (tied Parameter) is refused
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    before = snapshot(model)
    with pytest.raises(SurgeryError, match="layers.0.mlp.up_proj.weight is shared with model.layers.1.mlp.up_proj"):
        remove_groups(model, adapter_for(model).site("neurons", 0), np.arange(10))
    assert_unchanged(model, before)
    assert model.model.layers[0].mlp.gate_proj.out_features == 96


def test_shared_modules_and_unknown_module_types_are_refused():
    model = small_cnn()
    model.alias = model.bn1  # the same BatchNorm registered under a second name
    before = snapshot(model)
    site = adapter_for(model).site("channels", 0)
    with pytest.raises(SurgeryError, match="bn1.weight is shared with alias.weight"):
        remove_groups(model, site, np.arange(8))
    assert_unchanged(model, before)
    with pytest.raises(SurgeryError, match="no pruner for LayerNorm.*register_pruner"):
        pruner_for(nn.LayerNorm(4))


def test_trained_digits_cnn_shrinks_and_still_classifies():
    model, images, labels = digits_cnn()
    with torch.no_grad():
        dense_acc = (model(images).argmax(1) == labels).float().mean().item()
    assert dense_acc > 0.9  # the training worked (0.99 with the defaults)
    reference = copy.deepcopy(model)
    before = n_params(model)
    adapter = adapter_for(model)
    for layer in range(adapter.n_layers):
        site = adapter.site("channels", layer)
        conv = model.get_submodule(site.consumer)
        norms = conv.weight.detach().pow(2).sum((0, 2, 3))  # one norm per input channel
        keep = np.sort(torch.argsort(norms, descending=True)[: site.n_groups // 2].numpy())
        removed = np.setdiff1d(np.arange(site.n_groups), keep)
        zero_inputs(reference.get_submodule(site.consumer), removed, site.group_size)
        remove_groups(model, site, keep)
    assert (model.conv1.out_channels, model.conv2.in_channels, model.conv2.out_channels,
            model.bn2.num_features, model.conv3.in_channels) == (8, 8, 12, 12, 12)
    assert n_params(model) < 0.6 * before
    with torch.no_grad():
        logits = model(images)
        expected = reference(images)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    acc = (logits.argmax(1) == labels).float().mean().item()
    assert 0.0 <= acc <= 1.0 and acc > 0.1  # better than chance after removing half the channels


def test_llama_query_heads_duplicate_kv_heads_and_reload(tmp_path):
    """Query heads kept freely: unequal heads per KV group get duplicated KV
    heads (gcd rule), the outputs equal the dense model with those heads'
    o_proj inputs zeroed, and load_pruned rebuilds the grown k/v shapes."""
    model = tiny_llama(heads=6, kv_heads=2, hidden=96)  # 3 query heads per KV group, head_dim 16
    dense = copy.deepcopy(model)
    adapter = adapter_for(model)
    site = adapter.site("query-heads", 0)
    assert site.partition is None and site.n_groups == 6
    kept = {0: [0, 1, 3], 1: [1, 2, 4, 5]}  # counts (2, 1) -> 3 KV copies; (2, 2) -> gcd 2, 2 KV heads
    for layer, keep in kept.items():
        remove_groups(model, adapter.site("query-heads", layer), keep)
        zero_inputs(dense.model.layers[layer].self_attn.o_proj, np.setdiff1d(np.arange(6), keep), 16)
    attn0, attn1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    assert (attn0.q_proj.out_features, attn0.k_proj.out_features, attn0.v_proj.out_features) == (48, 48, 48)
    assert (attn1.q_proj.out_features, attn1.k_proj.out_features) == (64, 32)
    assert (attn0.num_key_value_groups, attn1.num_key_value_groups) == (1, 2)
    # the duplicated KV head is an exact copy of KV head 0
    torch.testing.assert_close(attn0.k_proj.weight[:16], attn0.k_proj.weight[16:32], rtol=0, atol=0)
    x = inputs("llama")
    torch.testing.assert_close(outputs(model, x), outputs(dense, x), rtol=1e-5, atol=1e-5)
    assert [(s["heads"], s["kv_heads"]) for s in model.config.osscar_layer_sizes] == [(3, 3), (4, 2)]
    loaded = load_pruned(save_pruned(model, None, tmp_path / "pruned"))
    torch.testing.assert_close(outputs(loaded, x), outputs(model, x), rtol=0, atol=0)


def test_llama_query_heads_uniform_layers_reload_with_the_standard_config(tmp_path):
    import transformers

    model = tiny_llama(heads=6, kv_heads=2, hidden=96)
    adapter = adapter_for(model)
    for layer in range(adapter.n_layers):
        remove_groups(model, adapter.site("query-heads", layer), [0, 2, 4])  # counts (2, 1): 3 KV heads
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (3, 3)
    x = inputs("llama")
    path = save_pruned(model, None, tmp_path / "pruned")
    plain = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    torch.testing.assert_close(outputs(plain, x), outputs(model, x), rtol=0, atol=0)


def test_saving_loading_and_evaluating_refuse_bad_paths_and_arguments(tmp_path):
    from osscar_opt.data import DataError
    from osscar_opt.errors import SolverError
    from osscar_opt.evaluation import evaluate_model

    model = tiny_llama()
    with pytest.raises(SurgeryError, match="no saved model folder at"):
        load_pruned(tmp_path / "missing")
    saved = save_pruned(model, None, tmp_path / "m")
    with pytest.raises(SurgeryError, match="already exists: pass overwrite=True"):
        save_pruned(model, None, saved)
    (saved / "config.json").unlink()
    with pytest.raises(SurgeryError, match="neither config.json nor osscar_pruned.json"):
        load_pruned(saved)
    with pytest.raises(DataError, match="needs its tokenizer"):
        evaluate_model(model, None)
    with pytest.raises(DataError, match="unknown model kind 'vision'"):
        evaluate_model(model, None, kind="vision")
    with pytest.raises(DataError, match="inputs= and labels="):
        evaluate_model(SmallCNN(), kind="classifier")
    cnn, images, labels = SmallCNN().eval(), torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    whole = evaluate_model(cnn, kind="classifier", inputs=images, labels=labels, device="cpu")
    moved = evaluate_model(cnn, kind="classifier", inputs=images, labels=labels, device="cpu", offload=True)
    assert moved["accuracy"] == whole["accuracy"] and moved["offloaded"]  # a CNN has no blocks: it moves whole
    with pytest.raises(SolverError, match="device 'gpu' is not supported by evaluate_model: use one of cpu, cuda"):
        evaluate_model(SmallCNN(), kind="classifier", inputs=torch.zeros(1, 1, 8, 8), labels=torch.zeros(1), device="gpu")
    short = tmp_path / "short.txt"
    short.write_text("a few words\n\nand a few more\n")
    from osscar_opt.evaluation import held_out_paragraphs

    with pytest.raises(DataError, match="evaluation half of .*short.txt' has no paragraph of at least 40 characters"):
        held_out_paragraphs(str(short))
    from osscar_opt import data

    with pytest.raises(DataError, match="calibration half of .*short.txt' has no paragraph"):  # encoder calibration
        data.paragraph_texts(str(short), "calibration")


def test_layer_config_overrides_one_field_and_follows_the_model_config():
    """Phi-3 attention reads its head count from the config: a pruned layer
    gets a LayerConfig with its own count; everything else (e.g. a later
    change of attention implementation) still comes from the model's config,
    also after deepcopy and pickling; writes go to the model's config, except
    to the layer's own count."""
    import pickle

    from small_models import tiny_llama_like

    from osscar_opt.surgery import LayerConfig

    model = tiny_llama_like("phi3")
    layer = LayerConfig(model.config, num_attention_heads=2)
    again = LayerConfig(layer, num_key_value_heads=1)  # stacking keeps one base and merges the overrides
    assert again.base is model.config and again.overrides == {"num_attention_heads": 2, "num_key_value_heads": 1}
    assert layer.num_attention_heads == 2 and model.config.num_attention_heads == 4
    model.config.rms_norm_eps = 1e-3
    assert layer.rms_norm_eps == 1e-3 and layer.hidden_size == model.config.hidden_size
    with pytest.raises(AttributeError, match="this layer's own value"):
        layer.num_attention_heads = 3
    layer.use_cache = False  # any other field is the model's: written through
    assert model.config.use_cache is False and layer.num_attention_heads == 2
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert copied.num_attention_heads == 2 and copied.hidden_size == model.config.hidden_size
