import numpy as np
import pytest
import torch

import osscar_opt as oo
from osscar_opt.adapters import UnsupportedModelError, adapter_for, input_rows
from osscar_opt.data import DataError
from osscar_opt.extract import CORRECTION_RIDGES, extract, fit_correction

from small_models import ARCHITECTURES, SmallCNN, random_tokens, tiny_llama


def _captured_inputs(model, module_name, batches):
    """Inputs of a module recorded by a plain hook, independently of GramHooks."""
    module = model.get_submodule(module_name)
    rows = []
    handle = module.register_forward_hook(lambda m, a, o: rows.append(input_rows(m, a[0].detach()).double()))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return torch.cat(rows).numpy()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_gram_from_hooks_equals_direct_product(arch):
    model = ARCHITECTURES[arch]()
    tokens = random_tokens()
    insts = extract(model, tokens, layers=[1], batch_size=4, progress=False, damping=0.0)
    assert {i.meta["structure"] for i in insts} == {"heads", "neurons"}
    for inst in insts:
        X = _captured_inputs(model, inst.meta["module"], [tokens[:4], tokens[4:]])
        np.testing.assert_allclose(inst.H, X.T @ X / X.shape[0], rtol=1e-10, atol=1e-12)
        assert inst.meta["samples"] == X.shape[0] == tokens.numel()


def test_instance_reproduces_a_direct_least_squares_error():
    model = tiny_llama()
    tokens = random_tokens(n=8)
    damping = 0.05
    (inst,) = extract(model, tokens, structures=["neurons"], layers=[0], damping=damping, keep=0.5, progress=False)
    X = _captured_inputs(model, "model.layers.0.mlp.down_proj", [tokens])
    W_hat = model.model.layers[0].mlp.down_proj.weight.detach().double().numpy().T
    n = X.shape[0]
    lam = damping * np.mean(np.sum(X * X, 0) / n)
    S = np.arange(0, inst.n_groups, 2)
    A = np.vstack([X[:, S] / np.sqrt(n), np.sqrt(lam) * np.eye(S.size)])
    B = np.vstack([X @ W_hat / np.sqrt(n), np.sqrt(lam) * W_hat[S]])
    W_S, *_ = np.linalg.lstsq(A, B, rcond=None)
    W = np.zeros_like(W_hat)
    W[S] = W_S
    loss = np.sum((X @ (W - W_hat)) ** 2) / n + lam * np.sum((W - W_hat) ** 2)
    total = np.sum((X @ W_hat) ** 2) / n + lam * np.sum(W_hat**2)
    assert oo.evaluate(inst, S).err == pytest.approx(loss / total, rel=1e-8)


def test_llama_heads_carry_the_gqa_partition():
    model = tiny_llama(heads=4, kv_heads=2)
    insts = extract(model, random_tokens(), structures=["heads", "kv-groups"], layers=[0], progress=False)
    heads, kv = insts
    assert heads.group_size == 16 and heads.n_groups == 4
    assert heads.partition.parts.tolist() == [0, 0, 1, 1] and heads.partition.budget.tolist() == [1, 1]
    assert kv.group_size == 32 and kv.n_groups == 2 and kv.partition is None
    assert heads.meta["module"] == kv.meta["module"] == "model.layers.0.self_attn.o_proj"
    np.testing.assert_array_equal(heads.H, kv.H)


def test_cnn_channels_are_unfolded_patches():
    model = SmallCNN().eval()
    images = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    insts = extract(model, images, progress=False, damping=0.0)
    assert [i.meta["module"] for i in insts] == ["conv2", "conv3"]  # conv1 reads the image
    for inst in insts:
        conv = model.get_submodule(inst.meta["module"])
        assert inst.group_size == 9 and inst.n_groups == conv.in_channels
        X = _captured_inputs(model, inst.meta["module"], [images])
        np.testing.assert_allclose(inst.H, X.T @ X / X.shape[0], rtol=1e-10, atol=1e-12)
        # the instance's W_hat reproduces the convolution output from patches
        out = model.get_submodule(inst.meta["module"])
        np.testing.assert_allclose(inst.W, out.weight.detach().double().reshape(out.out_channels, -1).T.numpy())


def test_bad_inputs_are_clear_errors():
    model = tiny_llama(layers=2)
    with pytest.raises(UnsupportedModelError, match="out of range.*0..1"):
        extract(model, random_tokens(), layers=[5], progress=False)
    with pytest.raises(UnsupportedModelError, match="no structure 'channels'.*heads, kv-groups, neurons"):
        extract(model, random_tokens(), structures=["channels"], progress=False)
    with pytest.raises(UnsupportedModelError, match="no adapter for 'Linear'.*llama"):
        adapter_for(torch.nn.Linear(3, 3))
    with pytest.raises(DataError, match="empty"):
        extract(model, torch.zeros(0, 8, dtype=torch.long), progress=False)
    with pytest.raises(DataError, match="calibration is a string"):
        extract(model, "def f(): pass", progress=False)

    def never_read():  # a keep out of range must be refused before the calibration pass
        raise AssertionError("the calibration was read")
        yield

    for keep, match in [(500, "keep=500 is out of range for model.layers.0.self_attn.o_proj: it has 4 groups"),
                        (-1, "keep=-1 is out of range"), (1.5, r"keep fraction must lie in \[0, 1\]"),
                        (True, "keep must be a fraction"), ("half", "keep must be a fraction")]:
        with pytest.raises(DataError, match=match):
            extract(model, never_read(), keep=keep, progress=False)


def test_one_structure_as_a_string_and_token_ids_as_an_array():
    model, tokens = tiny_llama(layers=2), random_tokens()
    (a,) = extract(model, tokens, structures=["neurons"], layers=[1], progress=False)
    (b,) = extract(model, tokens.numpy(), structures="neurons", layers=[1], progress=False)
    assert b.meta["structure"] == "neurons"
    np.testing.assert_array_equal(a.H, b.H)
    np.testing.assert_array_equal(a.W, b.W)


def test_padded_tokens_stay_out_of_the_gram():
    """Paragraph batches with an attention mask: X'X over the real tokens only."""
    from small_models import tiny_bert

    model = tiny_bert()
    ids = random_tokens(n=12, seq_len=24)
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    mask[2, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    (inst,) = extract(model, [batch], structures=["neurons"], layers=[0], damping=0.0, progress=False)
    module = model.get_submodule(inst.meta["module"])
    rows = []
    handle = module.register_forward_hook(lambda m, a, o: rows.append(a[0].detach().double()))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    X = rows[0][mask.bool()].numpy()
    assert X.shape[0] == int(mask.sum()) == inst.meta["samples"]
    np.testing.assert_allclose(inst.H, X.T @ X / X.shape[0], rtol=1e-10, atol=1e-12)


def _stats(X, gap):
    """(X'X/n, X'gap/n) as float64 tensors."""
    return torch.as_tensor(X.T @ X / len(X)), torch.as_tensor(X.T @ gap / len(X))


def _folds(X, gap):
    h = len(X) // 2
    return _stats(X, gap), (_stats(X[:h], gap[:h]), _stats(X[h:], gap[h:]))


def test_validated_correction_keeps_a_gap_the_inputs_predict():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4000, 12))
    B = rng.standard_normal((12, 5))
    (G, C), folds = _folds(X, X @ B + 0.01 * rng.standard_normal((4000, 5)))
    c, info = fit_correction(G, C, None, folds)
    assert info["ridge"] == min(CORRECTION_RIDGES) and info["shrink"] == 1.0 and info["gain"] > 0
    assert np.allclose(c.numpy(), B, atol=0.05)


def test_validated_correction_drops_a_gap_the_inputs_do_not_predict():
    """Pure noise and few rows per input: the unvalidated fit follows the
    noise and does worse than no correction on fresh rows; the validated one
    is shrunk towards zero and does no worse than no correction."""
    rng = np.random.default_rng(1)
    X, gap = rng.standard_normal((300, 60)), rng.standard_normal((300, 8))
    (G, C), folds = _folds(X, gap)
    c, info = fit_correction(G, C, None, folds)
    fixed, fixed_info = fit_correction(G, C, 0.01)
    assert fixed_info == {"ridge": 0.01, "shrink": 1.0}
    X_new, gap_new = rng.standard_normal((20000, 60)), rng.standard_normal((20000, 8))

    def loss(c):
        return float(np.mean((gap_new - X_new @ c.numpy()) ** 2))

    assert 0.0 <= info["shrink"] <= 1.0 and torch.linalg.norm(c) < 0.25 * torch.linalg.norm(fixed)
    assert loss(c) < loss(fixed) and loss(fixed) > 1.1 * loss(torch.zeros_like(c))
    assert loss(c) < 1.02 * loss(torch.zeros_like(c))


def test_fixed_ridge_correction_is_the_ridge_solution_and_validation_needs_two_folds():
    rng = np.random.default_rng(2)
    X, gap = rng.standard_normal((200, 7)), rng.standard_normal((200, 3))
    (G, C), folds = _folds(X, gap)
    c, _ = fit_correction(G, C, 0.3)
    expected = np.linalg.solve(G.numpy() + 0.3 * np.mean(np.diag(G.numpy())) * np.eye(7), C.numpy())
    assert np.allclose(c.numpy(), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(DataError, match="two folds"):
        fit_correction(G, C, None, folds[:1])


def test_correction_leaves_out_tokens_massive_in_either_model():
    """X'(R - S) of the dense-target correction skips the tokens whose hidden
    state is massive (over outlier_factor x the batch median norm) in the
    dense model (R) or in the model being pruned (S): an attention sink that
    one model has and the other lacks would otherwise dominate the fit."""
    from osscar_opt.extract import GramHooks

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5, dtype=torch.float64))
    x = torch.randn(1, 40, 6, dtype=torch.float64)
    x[0, 3] *= 500.0  # massive in the pruned model's state only
    with torch.no_grad():
        here = model(x)[0]
    dense = here + 0.1 * torch.randn(40, 5, dtype=torch.float64)
    dense[3] = here[0]  # the dense state is ordinary there
    dense[7] *= 500.0  # massive in the dense model only
    with GramHooks(model, ["0"], deltas={"0": (("0", "output"), [dense])}) as hooks, torch.no_grad():
        model(x)
    kept = torch.ones(40, dtype=torch.bool)
    kept[[3, 7]] = False
    X, delta = x[0][kept], (dense - here)[kept]
    assert torch.allclose(hooks.cross_sums["0"], X.T @ delta, rtol=1e-12, atol=1e-12)
    assert hooks.counts["0"] == 40  # the Gram matrix itself keeps every token


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_extract_runs_where_the_model_is_and_leaves_it_there():
    """A model on the GPU with device=None, and a CPU model with device="cuda",
    give the CPU's Gram matrices; neither model changes device."""
    tokens = random_tokens(n=4, seq_len=16)
    reference = extract(tiny_llama(), tokens, structures=["neurons"], layers=[1], progress=False)[0]
    on_gpu = tiny_llama().to("cuda")
    moved = tiny_llama()
    offloaded = tiny_llama()
    for model, device, offload in ((on_gpu, None, None), (moved, "cuda", None), (offloaded, "cuda", True)):
        inst = extract(model, tokens, structures=["neurons"], layers=[1], device=device, progress=False,
                       offload=offload)[0]
        np.testing.assert_allclose(inst.H, reference.H, rtol=1e-4, atol=1e-6 * np.abs(reference.H).max())
    assert {p.device.type for p in on_gpu.parameters()} == {"cuda"}
    assert {p.device.type for p in moved.parameters()} == {"cpu"}
    assert {p.device.type for p in offloaded.parameters()} == {"cpu"}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_extract_with_offloaded_blocks_gives_the_same_instances(arch):
    """offload=True (blocks in turns on the device, Gram matrices on the CPU;
    the path of a model larger than the GPU) extracts the same instances."""
    tokens = random_tokens(n=4, seq_len=16)
    whole = extract(ARCHITECTURES[arch](), tokens, device="cpu", offload=False, progress=False)
    blocks = extract(ARCHITECTURES[arch](), tokens, device="cpu", offload=True, progress=False)
    assert [i.meta["id"] for i in blocks] == [i.meta["id"] for i in whole]
    for a, b in zip(whole, blocks):
        np.testing.assert_array_equal(b.H, a.H)
        np.testing.assert_array_equal(b.W, a.W)


def test_moe_experts_are_one_instance_each():
    """Stacked experts give one instance per expert: its own rows of the
    stacked down_proj as W_hat, its routed tokens as samples, `keep` of its
    own neurons; the shared expert (Qwen2-MoE) an instance of its own."""
    from small_models import tiny_moe

    model = tiny_moe("qwen2_moe")
    insts = extract(model, random_tokens(n=4, seq_len=24), structures=("neurons", "shared-neurons"), layers=[1],
                    keep=16, progress=False)
    name = insts[0].meta["model"]
    assert [i.meta["id"] for i in insts] == [f"{name}-l1-neurons-e{e}" for e in range(4)] + [
        f"{name}-l1-shared-neurons"]
    down = model.model.layers[1].mlp.experts.down_proj.detach().double()
    for e, inst in enumerate(insts[:4]):
        assert inst.meta["expert"] == e and inst.keep == 16 and inst.n_groups == 48
        np.testing.assert_allclose(inst.W, down[e].T.numpy(), rtol=1e-12)
    assert sum(i.meta["samples"] for i in insts[:4]) == 2 * 4 * 24
    assert insts[4].n_groups == 80 and insts[4].meta["samples"] == 4 * 24
