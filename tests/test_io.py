import json
import os
import zipfile

import numpy as np
import pytest

import osscar_opt as oo
from osscar_opt import InstanceError, InstanceFileError
from osscar_opt.io import read_header

from conftest import random_instance


@pytest.fixture
def saved(tmp_path, rng):
    inst = random_instance(rng, p=9, group_size=3, keep=6, partition=np.repeat(np.arange(3), 3))
    inst.meta.update({"id": "test-instance", "model": "synthetic", "layer": 3})
    path = oo.save_instance(inst, tmp_path / "inst.npz")
    return inst, path


def test_round_trip_is_exact(saved):
    inst, path = saved
    back = oo.load_instance(path)
    assert np.array_equal(back.H, inst.H) and np.array_equal(back.W, inst.W)
    assert np.array_equal(back.groups, inst.groups) and back.group_size == 3
    assert back.keep == inst.keep and back.meta == inst.meta
    assert back.partition.budget.tolist() == inst.partition.budget.tolist()
    assert np.array_equal(back.partition.parts, inst.partition.parts)
    assert oo.evaluate(back, [0, 1, 3, 4, 6, 8]).objective == oo.evaluate(inst, [0, 1, 3, 4, 6, 8]).objective


def test_the_documented_plain_numpy_loader_reads_the_file(saved):
    inst, path = saved
    z = np.load(path)
    header = json.loads(bytes(z["header"]).decode())
    H, W, groups = z["H"], z["W"], z["groups"]
    assert header["keep"] == inst.keep and header["format"] == "osscar-instance"
    assert np.array_equal(H, inst.H) and np.array_equal(W, inst.W) and np.array_equal(groups, inst.groups)


def test_truncated_file_is_reported(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InstanceFileError, match="truncated or corrupt|corrupt"):
        oo.load_instance(bad)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"H,W,groups\n1,2,3\n", "is not an .npz archive"),
    (None, "is a single .npy array"),
    ("folder", "is a folder"),
])
def test_a_file_that_is_not_an_npz_archive_is_named_as_such(tmp_path, content, message):
    bad = tmp_path / "layer.npz"
    if content is None:  # a plain .npy array saved under an .npz name
        with open(bad, "wb") as fh:
            np.save(fh, np.eye(3))
    elif content == "folder":
        bad.mkdir()
    else:
        bad.write_bytes(content)
    for read in (oo.load_instance, read_header):
        with pytest.raises(InstanceFileError, match=message):
            read(bad)


def test_flipped_byte_is_reported(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the H member
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(InstanceFileError, match="corrupt|checksum"):
        oo.load_instance(bad)


def _rewrite(path, out, **changes):
    with np.load(path) as z:
        members = {k: z[k] for k in z.files}
    header = json.loads(bytes(members["header"]).decode())
    for key, value in changes.items():
        if key in members and key != "header":
            members[key] = value
        else:
            header[key] = value
    members["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(out, **members)
    return out


def test_modified_array_fails_the_checksum(saved, tmp_path):
    inst, path = saved
    W = inst.W.copy()
    W[0, 0] += 1.0
    with pytest.raises(InstanceFileError, match="checksum"):
        oo.load_instance(_rewrite(path, tmp_path / "edited.npz", W=W))


def test_mismatched_shapes_are_reported(saved, tmp_path):
    _, path = saved
    bad = _rewrite(path, tmp_path / "shape.npz", m=99)
    with pytest.raises(InstanceFileError, match="does not match its header"):
        oo.load_instance(bad, verify=False)


def test_newer_version_and_foreign_files_are_reported(saved, tmp_path):
    _, path = saved
    with pytest.raises(InstanceFileError, match="newer"):
        oo.load_instance(_rewrite(path, tmp_path / "v9.npz", version=9))
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.zeros(3))
    with pytest.raises(InstanceFileError, match="not an osscar instance"):
        oo.load_instance(foreign)
    with pytest.raises(InstanceFileError, match="no instance file"):
        oo.load_instance(tmp_path / "missing.npz")


def test_failed_save_leaves_no_file_and_keeps_the_old_one(saved, monkeypatch):
    inst, path = saved
    before = path.read_bytes()
    real_savez = np.savez

    def broken_savez(fh, **arrays):
        real_savez(fh, **{k: arrays[k] for k in list(arrays)[:2]})  # half written
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        oo.save_instance(inst, path)
    with pytest.raises(OSError, match="disk full"):
        oo.save_instance(inst, path.parent / "new.npz")
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["inst.npz"]  # no partial or temporary file


def test_meta_that_is_not_json_is_refused_before_writing(saved, tmp_path):
    inst, _ = saved
    inst.meta["bad"] = object()
    with pytest.raises(InstanceError, match="JSON"):
        oo.save_instance(inst, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_header_is_readable_alone(saved):
    _, path = saved
    header = read_header(path)
    assert header["d"] == 27 and header["checksum"].startswith("sha256:")
    assert os.stat(path).st_mode & 0o044  # group/other readable like any saved file
    assert zipfile.is_zipfile(path)
