"""Shaped models (an architecture with random weights) for timing where the
real weights cannot go: `osscar-opt bench-shaped` (also `python -m osscar_opt.benchmarks.shaped`)."""

import json

import pytest
import torch

from osscar_opt.apply import count_parameters
from osscar_opt.benchmarks.shaped import ShapedError, main, make, offload, parse_overrides

from small_models import tiny_llama


@pytest.fixture
def like(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "like")
    (tmp_path / "like" / "tokenizer_config.json").write_text("{}")
    return tmp_path / "like"


def test_make_writes_the_architecture_with_overrides_random_weights_and_the_tokenizer(like, tmp_path):
    from transformers import LlamaForCausalLM

    out = make(like, tmp_path / "shaped", {"intermediate_size": 40, "num_hidden_layers": 3}, seed=1)
    shaped = LlamaForCausalLM.from_pretrained(tmp_path / "shaped")
    assert (shaped.config.intermediate_size, shaped.config.num_hidden_layers) == (40, 3)
    assert shaped.model.layers[2].mlp.up_proj.weight.shape == (40, 64)
    assert out["parameters"] == count_parameters(shaped)
    assert (tmp_path / "shaped" / "tokenizer_config.json").read_text() == "{}"
    original = LlamaForCausalLM.from_pretrained(like)
    assert not torch.equal(shaped.model.embed_tokens.weight, original.model.embed_tokens.weight)
    # the same seed gives the same weights
    make(like, tmp_path / "again", {"intermediate_size": 40, "num_hidden_layers": 3}, seed=1)
    again = LlamaForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(again.model.layers[0].mlp.up_proj.weight, shaped.model.layers[0].mlp.up_proj.weight)
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_arguments_get_one_line_and_write_nothing(like, tmp_path, capsys):
    assert parse_overrides(["hidden_size=960", "rope_type=linear"]) == {"hidden_size": 960, "rope_type": "linear"}
    with pytest.raises(ShapedError, match="write NAME=VALUE"):
        parse_overrides(["hidden_size"])
    with pytest.raises(ShapedError, match="LlamaConfig has no such field"):
        make(like, tmp_path / "x", {"hiden_size": 10})
    with pytest.raises(ShapedError, match="builds no LlamaForCausalLM"):
        make(like, tmp_path / "neg", {"hidden_size": -5})
    with pytest.raises(ShapedError, match="no config.json in"):
        make(tmp_path, tmp_path / "y")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("")
    with pytest.raises(ShapedError, match="is not an empty folder"):
        make(like, tmp_path / "full")
    with pytest.raises(ShapedError, match="is not an empty folder"):
        make(like, tmp_path / "full" / "f")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "neg").exists()
    if not torch.cuda.is_available():
        with pytest.raises(ShapedError, match="offload measures GPU memory: --device cuda: torch.cuda.is_available"):
            offload(like, cap_gb=1.0)
    with pytest.raises(ShapedError, match="--device cpu: give cuda or cuda:N"):
        offload(like, cap_gb=1.0, device="cpu")
    assert main(["make", "--like", str(like), "--out", str(tmp_path / "z"), "--set", "bad"]) == 2
    assert "error: --set 'bad': write NAME=VALUE" in capsys.readouterr().err
    assert main(["make", "--like", str(like), "--out", str(tmp_path / "z"), "--set", "num_hidden_layers=1"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["num_hidden_layers"] == 1
    # the same actions as an osscar-opt command, its --device checked before any work
    from osscar_opt.cli import main as cli

    assert cli(["bench-shaped", "make", "--like", str(like), "--out", str(tmp_path / "z"), "--set", "bad"]) == 2
    assert "osscar-opt: error: --set 'bad': write NAME=VALUE" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli(["bench-shaped", "offload", "--model", str(like), "--cap-gb", "1"]) == 2
        assert "--device cuda: torch.cuda.is_available() is False" in capsys.readouterr().err
    assert cli(["bench-shaped", "make", "--like", str(like), "--out", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "config.json").is_file()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_prunes_with_the_gpu_capped_below_the_model_size(like, tmp_path):
    """A 64-block shaped model twice the GPU memory left to it: only the current block
    is on the GPU. (What the process holds already, cuBLAS's workspace among
    it, is added to the cap.)"""
    from transformers import LlamaForCausalLM

    from osscar_opt.apply import apply
    from osscar_opt.evaluation import perplexity
    from osscar_opt.placement import offloaded
    from small_models import random_tokens

    make(like, tmp_path / "big", {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 64,
                                  "head_dim": 64})
    model = LlamaForCausalLM.from_pretrained(tmp_path / "big")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.ones(64, 64, device="cuda") @ torch.ones(64, 64, device="cuda")  # cuBLAS's workspace, before the cap
    held = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((held + size / 2) / total)
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        report = apply(model, random_tokens(n=8, seq_len=64), 0.5, device="cuda", progress=False)
        assert torch.cuda.max_memory_allocated() - held <= size / 2
        # the pruned model evaluated under the same cap, its blocks offloaded
        torch.cuda.reset_peak_memory_stats()
        windows = random_tokens(n=4, seq_len=64)
        with offloaded(model, "cuda"):
            on_gpu = perplexity(model, windows, device="cuda")
        assert torch.cuda.max_memory_allocated() - held <= size / 2
        # dense activations: the model does not fit, so its blocks take turns on the GPU
        dense_mode = LlamaForCausalLM.from_pretrained(tmp_path / "big")
        torch.cuda.reset_peak_memory_stats()
        dense_report = apply(dense_mode, random_tokens(n=8, seq_len=64), 0.5, sequential=False, device="cuda",
                             progress=False)
        assert torch.cuda.max_memory_allocated() - held <= size / 2
        assert dense_report.params_after == report.params_after
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert report.params_after < report.params_before
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert on_gpu == pytest.approx(perplexity(model, windows), rel=1e-4)


def test_latency_times_a_dense_and_a_pruned_folder_per_dtype_and_batch(like, tmp_path, capsys):
    make(like, tmp_path / "narrow", {"intermediate_size": 24}, seed=2)
    out = tmp_path / "lat.json"
    assert main(["latency", "--dense", str(like), "--pruned", str(tmp_path / "narrow"), "--batches", "1,3",
                 "--seq-len", "16", "--dtypes", "float32,bfloat16", "--rounds", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dtype"], r["batch"]) for r in rows] == [("float32", 1), ("float32", 3), ("bfloat16", 1), ("bfloat16", 3)]
    for r in rows:
        assert r["dense_prefill_s"] > 0 and r["pruned_prefill_s"] > 0
        assert r["prefill_speedup"] == pytest.approx(r["dense_prefill_s"] / r["pruned_prefill_s"])
        assert ("generate_speedup" in r) == (r["batch"] == 1)
    capsys.readouterr()
    assert main(["latency", "--dense", str(like), "--pruned", str(like), "--batches", "1,x", "--device", "cpu"]) == 2
    assert "--batches 1,x: give comma-separated batch sizes" in capsys.readouterr().err
    assert main(["latency", "--dense", str(like), "--pruned", str(like), "--dtypes", "float33", "--device", "cpu"]) == 2
    assert "--dtypes float33: give torch dtype names" in capsys.readouterr().err
    for flag, value in (("--rounds", "0"), ("--batches", "1,0"), ("--seq-len", "-3")):
        assert main(["latency", "--dense", str(like), "--pruned", str(like), flag, value, "--device", "cpu"]) == 2
        assert f"{flag} takes positive integers" in capsys.readouterr().err
