"""Calibration and evaluation text (DESIGN.md section 4).

The default corpus is Python's own reference prose, `pydoc_data.topics`
(about 465k characters shipped with every CPython), joined with blank lines.
It is tokenized once and split by token position into two halves: the
calibration half (first) and the evaluation half (second). Windows are cut
from the start of a half, consecutively, so calibration and evaluation never
overlap; a seed instead draws window starts at random inside the half.
Held-out windows for choices made during pruning (`validation_windows`,
`validation_paragraphs`) are the calibration half's windows or paragraphs
that a calibration draw did not touch, never the evaluation half.

Other sources: `wikitext2`, `c4`, `ptb` through the `datasets` package when it
and the data are available locally, and local `.txt` / `.jsonl` files (split
the same way by position).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OsscarError, require

SPLITS = {"calibration": "calibration", "calib": "calibration", "train": "calibration",
          "evaluation": "evaluation", "eval": "evaluation", "test": "evaluation"}
DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", {"calibration": "train", "evaluation": "test"}, "text"),
    "ptb": ("ptb_text_only", "penn_treebank", {"calibration": "train", "evaluation": "test"}, "sentence"),
    "c4": ("allenai/c4", "en", {"calibration": "train", "evaluation": "validation"}, "text"),
}


class DataError(OsscarError, ValueError):
    """Text could not be found, read or cut into windows."""


def _split_name(split: str) -> str:
    try:
        return SPLITS[split]
    except KeyError:
        raise DataError(f"unknown split {split!r}: use 'calibration' or 'evaluation'") from None


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def _file_text(path: Path) -> str:
    try:
        return _read_text_file(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}): give a UTF-8 .txt / .jsonl file") from None
    except OSError as exc:
        raise DataError(f"cannot read the text file {path} ({exc.strerror or exc}): check the path and its permissions") from None


def _read_text_file(path: Path) -> str:
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"{path}:{i} is not a JSON object with a 'text' field") from None
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


def source_text(name: str) -> str | None:
    """The whole text of a positional source (pydoc or a local file); None for datasets."""
    if name == "pydoc":
        return pydoc_text()
    path = Path(name)
    if path.suffix in (".txt", ".jsonl", ".md"):
        if not path.exists():
            raise DataError(f"no text file at {path}: check the path")
        return _file_text(path)
    if name in DATASETS:
        return None
    raise DataError(
        f"unknown text source {name!r}: use 'pydoc', one of {', '.join(DATASETS)} (needs `datasets`), "
        "or a local .txt / .jsonl file"
    )


def load_text(name: str = "pydoc", split: str = "calibration") -> str:
    """Raw text of one split (by character position for positional sources)."""
    split = _split_name(split)
    text = source_text(name)
    if text is None:
        return _dataset_text(name, split)
    half = len(text) // 2
    return text[:half] if split == "calibration" else text[half:]


def _dataset_text(name: str, split: str) -> str:
    datasets = require("datasets", "data", f"the {name} corpus")
    path, config, splits, field = DATASETS[name]
    try:
        ds = datasets.load_dataset(path, config, split=splits[split])
    except Exception as exc:  # network or cache failures surface in many types
        raise DataError(
            f"cannot load {name} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}): "
            "download it once with `datasets` where the hub is reachable, or pass a local .txt file"
        ) from None
    if name == "c4":  # the C4 train split is huge: the first 20k documents
        ds = ds.select(range(min(len(ds), 20000)))
    return "\n\n".join(t for t in ds[field] if t)


def token_ids(tokenizer: Any, name: str = "pydoc", split: str = "calibration") -> np.ndarray:
    """Token ids of one split. Positional sources are tokenized whole and split
    at the middle token, so the two halves never share a token."""
    split = _split_name(split)
    text = source_text(name)
    if text is None:
        ids = _encode(tokenizer, _dataset_text(name, split))
        return ids
    if not text.strip():
        raise DataError(f"the text source {name!r} is empty: give a text with content")
    ids = _encode(tokenizer, text)
    half = ids.size // 2
    return ids[:half] if split == "calibration" else ids[half:]


def _encode(tokenizer: Any, text: str) -> np.ndarray:
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return np.asarray(enc["input_ids"], dtype=np.int64)


def windows(
    tokenizer: Any,
    name: str = "pydoc",
    split: str = "calibration",
    n_windows: int = 32,
    seq_len: int = 512,
    seed: int | None = None,
):
    """A (n_windows, seq_len) LongTensor of token windows from one split.

    Consecutive non-overlapping windows from the start of the split by default;
    with a seed, window starts are drawn uniformly inside the split.
    """
    import torch

    ids = _split_ids(tokenizer, name, split, n_windows, seq_len, seed)
    starts = _window_starts(ids.size, n_windows, seq_len, seed, f"the {split} split of {name!r}")
    return torch.as_tensor(np.stack([ids[s : s + seq_len] for s in starts]))


def _split_ids(tokenizer: Any, name: str, split: str, n_windows: int, seq_len: int, seed: int | None) -> np.ndarray:
    """The split's token ids, once the window arguments are checked."""
    if n_windows < 1 or seq_len < 1:
        raise DataError(f"need n_windows >= 1 and seq_len >= 1, got {n_windows} and {seq_len}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise DataError(f"the calibration seed must be a non-negative integer (or None for consecutive windows), "
                        f"got {seed!r}")
    ids = token_ids(tokenizer, name, split)
    if ids.size < seq_len:
        raise DataError(f"the {split} split of {name!r} has {ids.size} tokens, fewer than one window of {seq_len}: "
                        "use a longer text or a shorter --seq-len")
    return ids


def _window_starts(size: int, n_windows: int, seq_len: int, seed: int | None, what: str) -> np.ndarray:
    """Where `windows` cuts its windows from `size` tokens: consecutively from
    the start, or with a seed at starts drawn uniformly."""
    if seed is None:
        available = size // seq_len
        if available < n_windows:
            raise DataError(f"{what} holds {available} windows of {seq_len} tokens, {n_windows} requested: "
                            "ask for fewer windows or shorter ones")
        return np.arange(n_windows) * seq_len
    return np.random.default_rng(seed).integers(0, size - seq_len + 1, size=n_windows)


def validation_windows(tokenizer: Any, name: str = "pydoc", n_windows: int = 40, seq_len: int = 512,
                       calibration_windows: int = 32, seed: int | None = None):
    """A (n_windows, seq_len) LongTensor of calibration-half windows sharing no
    token with those `calibration(tokenizer, name, calibration_windows,
    seq_len, seed)` draws: the consecutive windows of the half, in order,
    skipping any that overlaps one of them (without a seed, the windows right
    after the calibration ones). For choices made on data the pruning did not
    see (apply(select="validation")), never on the evaluation half."""
    import torch

    ids = _split_ids(tokenizer, name, "calibration", min(n_windows, calibration_windows), seq_len, seed)
    used = np.zeros(ids.size, dtype=bool)
    for s in _window_starts(ids.size, calibration_windows, seq_len, seed, f"the calibration split of {name!r}"):
        used[s : s + seq_len] = True
    slots = ids.size // seq_len
    free = np.flatnonzero(~used[: slots * seq_len].reshape(slots, seq_len).any(axis=1))
    if free.size < n_windows:
        raise DataError(f"the calibration split of {name!r} holds {free.size} windows of {seq_len} tokens apart "
                        f"from the {calibration_windows} calibration ones, {n_windows} held-out requested: ask for "
                        "fewer held-out or calibration windows, or shorter ones")
    return torch.as_tensor(np.stack([ids[i * seq_len : (i + 1) * seq_len] for i in free[:n_windows]]))


class Calibration:
    """Token windows plus a description of where they came from."""

    def __init__(self, input_ids: Any, source: str = "tensor", split: str = "calibration",
                 seed: int | None = None, tokenizer_name: str | None = None, attention_mask: Any = None,
                 kind: str = "windows"):
        import torch

        self.attention_mask = None if attention_mask is None else torch.as_tensor(attention_mask).long()
        self.kind = kind
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None, :]
        if ids.dim() != 2 or ids.numel() == 0:
            raise DataError(f"calibration needs a non-empty (windows, seq_len) tensor of token ids, got shape {tuple(ids.shape)}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise DataError(f"calibration token ids must be integers, got {ids.dtype}")
        self.input_ids = ids.long()
        self.source, self.split, self.seed, self.tokenizer_name = source, split, seed, tokenizer_name

    @property
    def n_windows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def tokens(self) -> int:
        if self.attention_mask is not None:
            return int(self.attention_mask.sum())
        return int(self.input_ids.numel())

    def batches(self, batch_size: int):
        """Tensors of token ids, or dicts with the attention mask (padded paragraphs)."""
        for a in range(0, self.n_windows, batch_size):
            if self.attention_mask is None:
                yield self.input_ids[a : a + batch_size]
            else:
                yield {"input_ids": self.input_ids[a : a + batch_size],
                       "attention_mask": self.attention_mask[a : a + batch_size]}

    def describe(self) -> dict:
        return {"source": self.source, "split": self.split, "kind": self.kind, "windows": self.n_windows,
                "seq_len": self.seq_len, "tokens": self.tokens, "seed": self.seed}

    def __repr__(self) -> str:
        return f"<Calibration {self.source}/{self.split} {self.n_windows} x {self.seq_len} tokens>"


def calibration(tokenizer: Any, source: str = "pydoc", n_windows: int = 32, seq_len: int = 512,
                seed: int | None = None, split: str = "calibration") -> Calibration:
    """Calibration windows (the first half of `source` by default)."""
    ids = windows(tokenizer, source, split, n_windows, seq_len, seed)
    return Calibration(ids, source=source, split=_split_name(split), seed=seed,
                       tokenizer_name=getattr(tokenizer, "name_or_path", None))


def paragraph_texts(source: str = "pydoc", split: str = "calibration", n: int | None = None,
                    min_chars: int = 40) -> list[str]:
    """Paragraphs (blank-line separated, at least min_chars long) of one split; DataError if there is none."""
    text = load_text(source, split)
    paras = [p.strip().replace("\n", " ") for p in text.split("\n\n")]
    paras = [p for p in paras if len(p) >= min_chars]
    if not paras:
        raise DataError(f"the {_split_name(split)} half of {source!r} has no paragraph of at least {min_chars} "
                        "characters (paragraphs are separated by blank lines): give a longer text")
    return paras if n is None else paras[:n]


PARAGRAPHS_PER_SAMPLE = 8  # an encoder calibration "sample": 8 paragraphs of at most 128 tokens


def encoder_calibration(tokenizer: Any, source: str = "pydoc", nsamples: int = 32, seq_len: int = 128,
                        seed: int | None = None) -> Calibration:
    """The encoder counterpart of `calibration`: nsamples x PARAGRAPHS_PER_SAMPLE
    paragraphs of the calibration split, at most min(seq_len, 128) tokens each."""
    return paragraphs(tokenizer, source, n=nsamples * PARAGRAPHS_PER_SAMPLE, max_length=min(seq_len, 128), seed=seed)


def _paragraph_pick(count: int, n: int, seed: int | None) -> np.ndarray:
    """Which of `count` paragraphs `paragraphs(n=n, seed=seed)` takes, in order."""
    if seed is None:
        return np.arange(min(n, count))
    return np.sort(np.random.default_rng(seed).choice(count, size=min(n, count), replace=False))


def paragraphs(tokenizer: Any, source: str = "pydoc", n: int = 256, max_length: int = 128,
               split: str = "calibration", seed: int | None = None) -> Calibration:
    """Calibration for encoders: paragraphs of the split tokenized like sentence
    inputs (special tokens, padding to max_length, attention mask); padded
    positions are left out of the Gram matrices. The first n paragraphs, or
    with a seed n drawn at random without replacement."""
    texts = paragraph_texts(source, split)
    return _tokenized([texts[i] for i in _paragraph_pick(len(texts), n, seed)], tokenizer, source, split,
                      max_length, seed)


def validation_paragraph_texts(source: str = "pydoc", n: int = 256, calibration_paragraphs: int = 256,
                               seed: int | None = None) -> list[str]:
    """The encoder counterpart of `validation_windows`: the first n paragraphs
    of the calibration half, in order, that `paragraphs(n=calibration_paragraphs,
    seed=seed)` does not take."""
    texts = paragraph_texts(source, "calibration")
    left = np.setdiff1d(np.arange(len(texts)), _paragraph_pick(len(texts), calibration_paragraphs, seed))
    if left.size == 0:
        raise DataError(f"the calibration half of {source!r} has no paragraph apart from the "
                        f"{calibration_paragraphs} calibration ones: use fewer calibration samples")
    return [texts[i] for i in left[:n]]


def validation_paragraphs(tokenizer: Any, source: str = "pydoc", n: int = 256, max_length: int = 128,
                          calibration_paragraphs: int = 256, seed: int | None = None) -> Calibration:
    """`validation_paragraph_texts` tokenized like `paragraphs`."""
    return _tokenized(validation_paragraph_texts(source, n, calibration_paragraphs, seed), tokenizer, source,
                      "calibration", max_length, None)


def _tokenized(texts: list[str], tokenizer: Any, source: str, split: str, max_length: int,
               seed: int | None) -> Calibration:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return Calibration(enc["input_ids"], source=source, split=_split_name(split), attention_mask=enc["attention_mask"], seed=seed,
                       tokenizer_name=getattr(tokenizer, "name_or_path", None), kind="paragraphs")
