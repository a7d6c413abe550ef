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


def test_unknown_model_name_lists_the_embedded_ones():
    with pytest.raises(models.ModelError, match="unknown model 'smollm3'.*smollm2-135m, minilm-l6"):
        models.load("smollm3")
