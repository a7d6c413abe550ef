"""Instance files: one self-describing `.npz` file per instance.

The file is a plain (uncompressed) numpy `.npz` archive with the members

    header   uint8 array holding UTF-8 JSON: format, version, sizes, keep,
             group size, meta (provenance) and a sha256 checksum
    H        (d, d) float64, the damped Gram matrix
    W        (d, m) float64, the original weights W_hat (rows = input features)
    groups   (d,)   int64, the group id of every row
    parts    (p,)   int64, part id per group     (only with a partition)
    budget   (n_parts,) int64, kept per part     (only with a partition)

The checksum covers every array (name, dtype, shape and bytes, in the order
above) and the header without the checksum field. Files are written to a
temporary name in the same folder and renamed into place, so a failed save
never leaves a partial file. See instances/README.md for a plain-numpy loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InstanceError, InstanceFileError, OsscarError
from .instance import Instance

FORMAT = "osscar-instance"
VERSION = 1
_ARRAYS = ("H", "W", "groups", "parts", "budget")


def _canonical(header: dict) -> bytes:
    body = {k: v for k, v in header.items() if k != "checksum"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def checksum(arrays: dict[str, np.ndarray], header: dict) -> str:
    """sha256 over the arrays and the header (without its checksum field)."""
    h = hashlib.sha256()
    for name in _ARRAYS:
        if name not in arrays:
            continue
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    h.update(_canonical(header))
    return "sha256:" + h.hexdigest()


def _arrays_of(instance: Instance) -> dict[str, np.ndarray]:
    arrays = {
        "H": np.ascontiguousarray(instance.H, dtype=np.float64),
        "W": np.ascontiguousarray(instance.W, dtype=np.float64),
        "groups": np.ascontiguousarray(instance.groups, dtype=np.int64),
    }
    if instance.partition is not None:
        arrays["parts"] = np.ascontiguousarray(instance.partition.parts, dtype=np.int64)
        arrays["budget"] = np.ascontiguousarray(instance.partition.budget, dtype=np.int64)
    return arrays


def instance_checksum(instance: Instance) -> str:
    """The checksum `save_instance` would record for this instance."""
    return checksum(_arrays_of(instance), _header_of(instance))


def _header_of(instance: Instance) -> dict:
    header = {
        "format": FORMAT,
        "version": VERSION,
        "d": instance.d,
        "m": instance.m,
        "n_groups": instance.n_groups,
        "group_size": instance.group_size,
        "keep": instance.keep,
        "meta": instance.meta,
    }
    try:
        _canonical(header)
    except (TypeError, ValueError) as exc:
        raise InstanceError(
            f"instance meta is not JSON-serializable ({exc}): keep only str, int, float, bool, list and dict in meta"
        ) from None
    return header


def save_instance(instance: Instance, path: str | os.PathLike) -> Path:
    """Write `instance` to `path` atomically; returns the path written."""
    if not isinstance(instance, Instance):
        raise InstanceError(f"save_instance expects an Instance, got {type(instance).__name__}")
    path = Path(path)
    if path.suffix != ".npz":
        raise InstanceFileError(f"instance files end in .npz, got {path.name!r}: rename the target")
    arrays = _arrays_of(instance)
    header = _header_of(instance)
    header["checksum"] = checksum(arrays, header)
    blob = np.frombuffer(json.dumps(header, sort_keys=True, allow_nan=False).encode(), dtype=np.uint8)
    def write(fh):
        np.savez(fh, header=blob, **arrays)

    atomic_write(path, write, binary=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def writable_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create folder `path` if needed and check that files can be written into it (before long work starts)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OsscarError(f"{flag} {path} is a file: give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OsscarError(f"cannot write to {flag} {path} ({e.strerror or e}): choose a writable folder") from None
    return path


def atomic_write(path: str | os.PathLike, write, binary: bool = False) -> Path:
    """Call write(fh) on a temporary file next to `path`, then rename it into
    place: readers see the old file or the whole new one, never a partial one,
    and a failure leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": "\n"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj, **dump_options) -> Path:
    """Write `obj` as indented JSON atomically (see `atomic_write`)."""
    options = {"indent": 1, **dump_options}
    return atomic_write(path, lambda fh: (json.dump(obj, fh, **options), fh.write("\n")))


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of an instance file, without loading the matrices."""
    path = Path(path)
    with _open(path) as z:
        return _header(z, path)


def _open(path: Path):
    if not path.exists():
        raise InstanceFileError(f"no instance file at {path}: check the path, or rebuild with `osscar-opt instances build`")
    if path.is_dir():
        raise InstanceFileError(f"{path} is a folder, not an instance file: give the path of an .npz instance")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise InstanceFileError(f"cannot read {path} ({exc.strerror or exc}): check its permissions") from None
    if magic[:2] != b"PK":  # every .npz is a zip archive; np.load would read anything else as .npy or pickle
        what = "is empty" if not magic else "is a single .npy array" if magic == b"\x93NUM" else "is not an .npz archive"
        raise InstanceFileError(
            f"{path} {what}, not an instance file: re-download it, rebuild it with `osscar-opt instances build`, "
            "or write one with osscar_opt.save_instance"
        )
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise InstanceFileError(
            f"{path} is not a readable instance file (truncated or corrupt: {exc}); "
            "re-download it or rebuild it with `osscar-opt instances build`"
        ) from None


def _header(z: Any, path: Path) -> dict:
    if "header" not in z.files:
        raise InstanceFileError(f"{path} is an .npz file but not an osscar instance (no header member)")
    try:
        header = json.loads(bytes(z["header"]).decode())
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InstanceFileError(f"{path} has a corrupt header ({exc}): re-download or rebuild the file") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise InstanceFileError(f"{path} is not an osscar instance file (format {header.get('format')!r})")
    version = header.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise InstanceFileError(
            f"{path} has format version {version!r}, newer than this osscar-opt reads ({VERSION}): upgrade osscar-opt"
        )
    return header


def load_instance(path: str | os.PathLike, verify: bool = True) -> Instance:
    """Read and validate an instance file (checksum, shapes, then Instance checks)."""
    path = Path(path)
    with _open(path) as z:
        header = _header(z, path)
        arrays = {}
        for name in _ARRAYS:
            if name in z.files:
                try:
                    arrays[name] = z[name]
                except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
                    raise InstanceFileError(
                        f"{path}: member {name!r} is corrupt ({exc}); re-download or rebuild the file"
                    ) from None
    for name in ("H", "W", "groups"):
        if name not in arrays:
            raise InstanceFileError(f"{path} lacks the array {name!r}: the file is incomplete; rebuild it")
    if verify:
        recorded = header.get("checksum")
        actual = checksum(arrays, header)
        if recorded != actual:
            raise InstanceFileError(
                f"{path} fails its checksum (recorded {recorded}, computed {actual}): "
                "the file was modified or corrupted; re-download or rebuild it"
            )
    d, m = header.get("d"), header.get("m")
    if arrays["H"].shape != (d, d) or arrays["W"].shape != (d, m) or arrays["groups"].shape != (d,):
        raise InstanceFileError(
            f"{path} does not match its header (H {arrays['H'].shape}, W {arrays['W'].shape}, d={d}, m={m}): rebuild it"
        )
    partition = None
    if "parts" in arrays:
        if "budget" not in arrays:
            raise InstanceFileError(f"{path} has partition parts but no budget: rebuild it")
        partition = (arrays["parts"], arrays["budget"])
    try:
        return Instance(
            arrays["H"], arrays["W"], header["keep"], groups=arrays["groups"],
            partition=partition, meta=header.get("meta") or {},
        )
    except InstanceError as exc:
        raise InstanceFileError(f"{path}: {exc}") from None
