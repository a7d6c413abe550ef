"""Choosing attention supports by the estimated change of the model's loss
(`osscar_opt.loss_select`, apply(select=...)), on small models built in-process."""

import copy
import re

import numpy as np
import pytest
import torch

from osscar_opt.apply import PruneError, apply
from osscar_opt.data import DataError
from osscar_opt.evaluate import evaluate, evaluate_masked, n_supports, supports
from osscar_opt.extract import extract
from osscar_opt.data import Calibration
from osscar_opt.loss_select import HeldOut, LossCurvature, choose_by_loss, loss_curvature

from conftest import random_instance
from small_models import ARCHITECTURES, random_tokens, tiny_llama


def _mean_loss(model, tokens):
    logits = model(input_ids=tokens).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@pytest.mark.parametrize("arch, name", [("llama", "model.layers.1.self_attn.o_proj"),
                                        ("gpt2", "transformer.h.1.attn.c_proj"),
                                        ("opt", "model.decoder.layers.1.self_attn.out_proj")])
def test_curvature_is_the_weight_gradient_and_the_gradient_outer_products_of_the_mean_loss(arch, name):
    """C = sum_t x_t g_t' is the gradient of the mean calibration loss with
    respect to the consumer's weight (rows its inputs: Linear's transposed,
    GPT-2's Conv1D as stored), and F = sum_t g_t g_t' with g_t the gradient
    at the consumer's output: both checked against autograd on the whole
    model, with the parameters taking gradients as usual."""
    model = ARCHITECTURES[arch]().double()
    tokens = random_tokens(6, 12, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (curv,) = loss_curvature(model, [name], [tokens[:4], tokens[4:]]).values()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert curv.tokens == 6 * 11

    outputs = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_hook(lambda m, a, out: outputs.append(out) or out.retain_grad())
    loss = _mean_loss(model, tokens)
    loss.backward()
    handle.remove()
    grad = module.weight.grad if arch == "gpt2" else module.weight.grad.T
    np.testing.assert_allclose(curv.C, grad.numpy(), rtol=1e-9, atol=1e-14)
    g = outputs[0].grad.reshape(-1, outputs[0].shape[-1])
    np.testing.assert_allclose(curv.F, (g.T @ g).numpy(), rtol=1e-9, atol=1e-16)


def test_the_estimate_follows_the_loss_for_a_small_change_of_the_weights():
    """The first-order part of the estimate is the directional derivative of
    the mean loss (finite differences on the model), and the whole estimate is
    quadratic in the change with the documented terms."""
    model = tiny_llama().double()
    tokens = random_tokens(6, 12, seed=4)
    name = "model.layers.0.self_attn.o_proj"
    (curv,) = loss_curvature(model, [name], [tokens]).values()
    (inst,) = extract(model, tokens, structures=("heads",), layers=[0], keep=0.5, progress=False)
    module = dict(model.named_modules())[name]
    rng = np.random.default_rng(0)
    D = rng.normal(size=inst.W.shape) * 1e-4
    with torch.no_grad():
        base = float(_mean_loss(model, tokens))
        module.weight += torch.from_numpy(D.T)
        moved = float(_mean_loss(model, tokens))
        module.weight -= torch.from_numpy(D.T)
    first = float(np.sum(D * curv.C))  # C: the gradient of the mean loss
    assert moved - base == pytest.approx(first, rel=2e-3)
    second = 0.5 * curv.tokens * float(np.sum((inst.H @ D) * (D @ curv.F)))
    assert curv.estimate(inst, inst.W + D) == pytest.approx(first + second, rel=1e-12)


def _curvature(inst, rng):
    d, m = inst.W.shape
    g = rng.normal(size=(50, m))
    return LossCurvature(rng.normal(size=(d, m)), g.T @ g, 100)


@pytest.mark.parametrize("partition", [None, [0, 0, 0, 1, 1, 1, 2, 2, 2]])
def test_choose_by_loss_scores_every_support_or_climbs_to_a_swap_optimum(partition):
    rng = np.random.default_rng(5)
    inst = random_instance(rng, p=9, group_size=2, keep=3 if partition is None else 6, m=4, partition=partition)
    curv = _curvature(inst, rng)
    values = {S: curv.estimate(inst, evaluate(inst, S).weights) for S in supports(inst)}
    assert len(values) == n_supports(inst)
    start = min(values, key=lambda S: evaluate(inst, S).err)  # the err optimum
    choice = choose_by_loss(inst, start, curv)
    best = min(values, key=values.get)
    assert choice.method == "all" and choice.scored == len(values)
    assert tuple(choice.keep) == best and choice.estimate == pytest.approx(values[best])
    assert choice.start_estimate == pytest.approx(values[start])
    ev = evaluate(inst, best)
    np.testing.assert_array_equal(choice.weights, ev.weights)
    assert choice.err == ev.err

    climbed = choose_by_loss(inst, start, curv, max_enumerate=1)
    assert climbed.method == "swaps" and climbed.scored < len(values) + 1
    assert climbed.estimate <= climbed.start_estimate
    kept = set(climbed.keep.tolist())
    parts = np.zeros(inst.n_groups, int) if partition is None else np.asarray(partition)
    for S in supports(inst):  # no single in-part swap lowers it
        if len(kept - set(S)) == 1 and len(set(parts[list(kept - set(S))]) | set(parts[list(set(S) - kept)])) == 1:
            assert values[S] >= climbed.estimate - 1e-15


def test_choose_by_loss_without_refit_scores_the_deployed_unrefit_weights():
    rng = np.random.default_rng(6)
    inst = random_instance(rng, p=6, keep=3, m=4)
    curv = _curvature(inst, rng)
    choice = choose_by_loss(inst, (0, 1, 2), curv, refits=False)
    W = np.zeros_like(inst.W)
    W[choice.keep] = inst.W[choice.keep]
    np.testing.assert_array_equal(choice.weights, W)
    assert choice.err == evaluate_masked(inst, choice.keep)[1]
    masked = {S: curv.estimate(inst, np.where(np.isin(np.arange(6), S)[:, None], inst.W, 0.0)) for S in supports(inst)}
    assert choice.estimate == pytest.approx(min(masked.values()))


def test_apply_select_loss_writes_the_lowest_estimate_and_reports_the_solvers_choice():
    """select='loss' on a causal LM: each head site writes the support with the
    lowest estimate among all of its feasible supports (the solver's support,
    err and estimate are reported beside it); the default, select='err',
    writes the solver's. Encoders refuse 'loss'."""
    cal = random_tokens(8, 16, seed=1)
    by_loss, by_err = tiny_llama(), tiny_llama()
    rl = apply(by_loss, cal, 0.5, solver="obs-greedy", progress=False, select="loss")
    re_ = apply(by_err, cal, 0.5, solver="obs-greedy", progress=False)
    assert rl.select == "loss" and re_.select == "err" and rl.select_seconds > 0
    heads_l = [s for s in rl.sites if s.structure == "heads"]
    heads_e = [s for s in re_.sites if s.structure == "heads"]
    assert all(s.selection is None for s in re_.sites)
    assert all(s.selection is None for s in rl.sites if s.structure == "neurons")
    for sl, se in zip(heads_l, heads_e):
        sel = sl.selection
        assert sel["method"] == "all" and sel["scored"] == 4  # one of 2 query heads kept in each of 2 KV groups
        assert sel["estimate"] <= sel["solver_estimate"]
        assert sl.err >= sel["solver_err"] - 1e-12  # the solver's is the err optimum here
    assert heads_l[0].selection["solver_keep"] == heads_e[0].keep  # same instance at the first site
    assert heads_l[0].selection["solver_err"] == pytest.approx(heads_e[0].err)
    assert "select=loss: 2 attention sites" in rl.to_markdown()
    assert rl.to_dict()["select"] == "loss"

    for arch in ("gpt2", "opt"):  # GPT-2's Conv1D and OPT's out_proj consumers
        report = apply(ARCHITECTURES[arch](), cal, 0.5, progress=False, select="loss")
        heads = [s for s in report.sites if s.structure == "heads"]
        assert len(heads) == 2 and all(s.selection["estimate"] <= s.selection["solver_estimate"] for s in heads)

    bert = ARCHITECTURES["bert"]()
    tokens = random_tokens(4, 16, seed=2, vocab=bert.config.vocab_size)
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    with pytest.raises(PruneError, match="gives no next-token logits.*use select='err'"):
        apply(bert, tokens, 0.5, progress=False, select="loss")
    with pytest.raises(PruneError, match="gives no next-token logits"):
        loss_curvature(bert, ["encoder.layer.0.attention.output.dense"], [tokens])
    assert all(p.grad is None and p.requires_grad for p in bert.parameters())
    with pytest.raises(PruneError, match="select must be one of 'err', 'validation', 'loss'"):
        apply(bert, tokens, 0.5, progress=False, select="nope")
    assert all(torch.equal(before[k], v) for k, v in bert.state_dict().items())


def test_select_validation_writes_the_support_or_start_of_lower_held_out_loss():
    """select='validation' with OSSCAR: at each attention site where its local
    search left its greedy start, the two supports are scored by the model's
    loss on the held-out windows and the lower is written; the last site's
    score is the pruned model's own held-out loss. Bad input is refused with
    the model untouched."""
    cal, val = random_tokens(8, 16, seed=1), random_tokens(6, 16, seed=7)

    def held_out_loss(model, windows):
        return HeldOut(Calibration(windows), encoder=False)(model)

    kwargs = dict(solver="osscar", progress=False, structures=("heads",), stage_fraction=1.0)  # one-stage greedy
    model = ARCHITECTURES["gpt2"]()
    report = apply(model, cal, 0.5, select="validation", validation=val, **kwargs)
    greedy = apply(ARCHITECTURES["gpt2"](), cal, 0.5, local_search=False, **kwargs)
    searched = apply(ARCHITECTURES["gpt2"](), cal, 0.5, **kwargs)
    chosen = [s for s in report.sites if s.selection is not None]
    assert report.validation["sites"] == len(chosen) == 2 and report.validation["moved"] == 1
    assert report.validation["dense_score"] == pytest.approx(held_out_loss(ARCHITECTURES["gpt2"](), val), rel=1e-12)
    assert report.validation["structures"] == ["heads"] and report.validation["score"] == "loss"
    for s in chosen:
        sel = s.selection
        assert sel["method"] == "validation" and sel["candidates"][0] == sel["solver_keep"] != sel["candidates"][1]
        assert s.keep == sel["candidates"][int(np.argmin(sel["scores"]))]
    # the first site is the same instance in all three runs: the solver's support and its greedy start
    assert chosen[0].selection["solver_keep"] == searched.sites[0].keep
    assert chosen[0].selection["candidates"][1] == greedy.sites[0].keep
    assert held_out_loss(model, val) == pytest.approx(min(chosen[-1].selection["scores"]), rel=1e-5)
    assert "select=validation (heads): at 2 sites" in report.to_markdown()
    assert report.to_dict()["validation"]["moved"] == 1

    mapped = apply(ARCHITECTURES["gpt2"](), cal, 0.5, **dict(kwargs, solver={"heads": "osscar"}),
                   select="validation", validation=val)
    assert [s.keep for s in mapped.sites] == [s.keep for s in report.sites]
    plain = apply(ARCHITECTURES["gpt2"](), cal, 0.5, solver="obs-greedy", progress=False, structures=("heads",),
                  select="validation", validation=val)  # no start reported: nothing to choose from
    assert plain.validation["sites"] == 0 and all(s.selection is None for s in plain.sites)
    llama = tiny_llama()
    for kw, error, message in [
            (dict(select="validation"), PruneError, "select='validation' needs held-out windows"),
            (dict(validation=val), PruneError, "only read by select='validation'"),
            (dict(select="validation", validation=val + 1000), DataError, "outside the model's vocabulary"),
            (dict(select="validation", validation=val[:, :1]), DataError, "need at least 2 tokens"),
            (dict(select="validation", validation=val, validate=("kv-groups",)), PruneError,
             "validate names 'kv-groups', which this call does not prune"),
            (dict(validate=("heads",)), PruneError, "validate names the structures select='validation' checks")]:
        before = {k: v.clone() for k, v in llama.state_dict().items()}
        with pytest.raises(error, match=re.escape(message)):
            apply(llama, cal, 0.5, progress=False, **kw)
        assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items()), message


def test_select_validation_scores_a_solver_that_does_not_refit_with_unrefit_weights():
    """A registered solver that deploys W_hat unrefit (refits=False) and reports
    a greedy start: both candidates are scored, and written, as that solver
    deploys them, so every kept row is the dense model's own row."""
    from osscar_opt.adapters import adapter_for, weight_matrix
    from osscar_opt.osscar import Osscar
    from osscar_opt.registry import _REGISTRY, register

    class UnrefitOsscar(Osscar):
        name = "osscar-unrefit-test"
        refits = False

    cal, val = random_tokens(8, 16, seed=1), random_tokens(6, 16, seed=7)
    dense = ARCHITECTURES["gpt2"]()
    model = copy.deepcopy(dense)
    register(UnrefitOsscar)
    try:
        report = apply(model, cal, 0.5, solver=UnrefitOsscar.name, progress=False, structures=("heads",),
                       stage_fraction=1.0, targets="layer", select="validation", validation=val)
    finally:
        _REGISTRY.pop(UnrefitOsscar.name, None)
    chosen = [s for s in report.sites if s.selection is not None]
    assert report.validation["sites"] == len(chosen) >= 1 and report.validation["moved"] >= 1  # a start written
    size = adapter_for(dense).site("heads", 0).group_size
    for s in report.sites:
        rows = torch.cat([torch.arange(g * size, (g + 1) * size) for g in s.keep])
        assert torch.equal(weight_matrix(model.get_submodule(s.module)),
                           weight_matrix(dense.get_submodule(s.module))[rows])
    for s in chosen:
        assert s.keep == s.selection["candidates"][int(np.argmin(s.selection["scores"]))]
    final = HeldOut(Calibration(val), encoder=False)(model)
    assert final == pytest.approx(min(chosen[-1].selection["scores"]), rel=1e-5)


def test_select_validation_on_an_encoder_scores_embedding_fidelity_and_can_check_neurons():
    """An encoder's held-out score is 1 - the mean cosine of its mean-pooled
    embeddings (padding masked) to the dense model's; validate=("heads",
    "neurons") checks both structures, and each written support is the
    better-scoring of OSSCAR's support and its greedy start."""
    bert = ARCHITECTURES["bert"]()
    vocab = bert.config.vocab_size
    cal = random_tokens(8, 16, seed=2, vocab=vocab)
    ids = random_tokens(6, 16, seed=5, vocab=vocab)
    mask = torch.ones_like(ids)
    mask[:3, 10:] = 0  # padded tails
    val = {"input_ids": ids, "attention_mask": mask}
    dense = copy.deepcopy(bert)
    report = apply(bert, cal, 0.5, solver="osscar", progress=False, select="validation", validation=val,
                   validate=("heads", "neurons"), stage_fraction=1.0)
    v = report.validation
    assert v["score"] == "1 - fidelity" and v["structures"] == ["heads", "neurons"]
    assert v["dense_score"] == pytest.approx(0.0, abs=1e-12)
    assert "the dense model's 1 - fidelity: 0.0000)" in report.to_markdown()  # not -0.0000 from round-off
    chosen = [s for s in report.sites if s.selection is not None]
    assert v["sites"] == len(chosen) >= 1 and "neurons" in {s.structure for s in chosen}
    for s in chosen:
        assert s.keep == s.selection["candidates"][int(np.argmin(s.selection["scores"]))]
    # the score by hand: mean-pooled over unpadded tokens, normalized, cosine to the dense model's
    def embed(model):
        with torch.no_grad():
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
        m = mask.unsqueeze(-1).double()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    score = HeldOut(Calibration(ids, attention_mask=mask), encoder=True)
    assert score(dense) == pytest.approx(0.0, abs=1e-12)
    by_hand = 1.0 - float((embed(bert) * embed(dense)).sum(1).mean())
    # pooled in fp32 there: 1 - cos of near-equal embeddings, so round-off counts absolutely (seen: 2e-11)
    assert score(bert) == pytest.approx(by_hand, rel=1e-6, abs=1e-9) and by_hand > 1e-7
    assert chosen[-1] is report.sites[-1]  # the last site's score is the pruned model's
    assert by_hand == pytest.approx(min(chosen[-1].selection["scores"]), rel=1e-4, abs=1e-7)


def _three_layers(family):
    from small_models import tiny_bert, tiny_gpt2, tiny_gpt_neox, tiny_llama_like, tiny_moe, tiny_opt

    kind, _, name = family.partition(":")
    return {"llama": lambda: tiny_llama(layers=3), "bert": lambda: tiny_bert(layers=3),
            "opt": lambda: tiny_opt(layers=3), "gpt2": lambda: tiny_gpt2(layers=3),
            "gpt_neox": lambda: tiny_gpt_neox(layers=3), "like": lambda: tiny_llama_like(name, layers=3),
            "moe": lambda: tiny_moe(name, layers=3)}[kind]().eval()


@pytest.mark.parametrize("family", ["llama", "bert", "opt", "gpt2", "gpt_neox", "like:gemma2", "like:cohere",
                                    "like:gemma3", "like:phi3", "moe:mixtral", "moe:deepseek_v3", "moe:gpt_oss"])
def test_held_out_score_after_recorded_blocks_is_the_full_pass_score(family):
    """Scoring from recorded outputs of the first k blocks gives the full
    pass's score (sliding-window and full layers in turn, parallel residuals,
    MoE routing, padded encoder inputs), the skipped blocks never run, a
    longer record carries on from a shorter one, and a changed block is
    seen once forgotten."""
    from osscar_opt.adapters import adapter_for

    model = _three_layers(family)
    adapter = adapter_for(model)
    encoder = family == "bert"
    vocab = model.config.vocab_size
    ids = random_tokens(7, 12, seed=4, vocab=vocab)  # 7 windows in batches of 3: a short last batch
    mask = torch.ones_like(ids)
    mask[:2, 8:] = 0
    inputs = Calibration(ids, attention_mask=mask if encoder else None)
    score = HeldOut(inputs, encoder=encoder, batch_size=3)
    dense = score(model)  # the encoder's reference
    blocks = [adapter.block(j) for j in range(adapter.n_layers)]
    probes = [next(m for m in b.children()) for b in blocks]  # a submodule: runs only inside the block's forward
    inner = []
    handles = [p.register_forward_pre_hook(lambda m, a, j=j: inner.append(j)) for j, p in enumerate(probes)]
    score.record(model, blocks[:1])
    inner.clear()
    assert score(model, skip=blocks[:1]) == pytest.approx(dense, rel=1e-6, abs=1e-9)
    assert 0 not in inner and {1, 2} <= set(inner)
    score.record(model, blocks[:2])  # carries on: block 0 stands in, block 1 runs
    assert score.n_recorded == 2 and len(score.recorded) == 3
    inner.clear()
    assert score(model, skip=blocks[:2]) == pytest.approx(dense, rel=1e-6, abs=1e-9)
    assert set(inner) == {2}
    with pytest.raises(PruneError, match="2 are recorded: call record"):
        score(model, skip=blocks[:1])
    with torch.no_grad():  # block 1 changes: its recorded outputs are stale until forgotten
        for p in blocks[1].parameters():
            p.mul_(0.5)
    changed = HeldOut(inputs, encoder=encoder, batch_size=3)
    changed.reference = score.reference
    full = changed(model)
    assert full != pytest.approx(dense, rel=1e-6)
    score.forget()
    score.record(model, blocks[:2])
    assert score(model, skip=blocks[:2]) == pytest.approx(full, rel=1e-6, abs=1e-9)
    for h in handles:
        h.remove()
    assert not any("forward" in vars(b) for b in blocks)  # the blocks' own forward back


def test_scoring_batches_hold_about_1024_tokens_on_a_cpu_and_give_the_same_scores():
    """Perplexity and HeldOut score in batches of `scoring_batch` windows
    (1024 tokens on a CPU, 8 windows on an accelerator) when not told, with
    the scores of any other batching."""
    from osscar_opt.evaluation import perplexity, scoring_batch

    assert [scoring_batch(n, "cpu") for n in (128, 300, 512, 4096)] == [8, 3, 2, 1]
    assert scoring_batch(512, "cuda") == scoring_batch(512, torch.device("cuda", 0)) == 8
    model = tiny_llama()
    windows = random_tokens(7, 300, seed=2)
    calls = []
    handle = model.model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape[0]),
                                                   with_kwargs=True)
    by_default = perplexity(model, windows)
    assert calls == [3, 3, 1]
    assert by_default == pytest.approx(perplexity(model, windows, batch_size=7), rel=1e-6)
    calls.clear()
    score = HeldOut(Calibration(windows), encoder=False)
    assert score(model) == pytest.approx(HeldOut(Calibration(windows), encoder=False, batch_size=7)(model), rel=1e-6)
    assert calls[:3] == [3, 3, 1] and score.batch_size == 3
    handle.remove()
