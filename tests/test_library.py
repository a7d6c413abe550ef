"""The instance library: catalog integrity and the committed files."""

import json

import numpy as np
import pytest

import osscar_opt as oo
from osscar_opt import library
from osscar_opt.io import read_header


@pytest.fixture(scope="module")
def catalog():
    return library.Catalog.load()


def test_catalog_covers_both_models_every_tier_and_every_layer(catalog):
    entries = catalog.entries
    assert len(entries) >= 200
    assert {e["tier"] for e in entries} == {"T0", "T1", "T2", "T3"}
    for e in entries:
        assert e["tier"] == library.tier_of(e["p"], bool(e["recipe"]["crop"]))
    smol = {(e["layer"], e["structure"], e["keep"]) for e in entries if e["model"] == "smollm2-135m" and not e["recipe"]["crop"]}
    for layer in range(30):
        for keep in (384, 768, 1152):
            assert (layer, "neurons", keep) in smol
        for keep in (2, 4, 7):
            assert (layer, "heads", keep) in smol
    mini = {(e["layer"], e["structure"]) for e in entries if e["model"] == "minilm-l6"}
    assert {(layer, s) for layer in range(6) for s in ("heads", "neurons")} <= mini
    assert len({e["id"] for e in entries}) == len(entries)


def test_every_committed_file_loads_and_matches_the_catalog(catalog):
    committed = [e for e in catalog.entries if e["file"]]
    assert committed and {e["tier"] for e in committed} == {"T0", "T1"}
    for e in committed:
        path = catalog.file_of(e)
        assert read_header(path)["checksum"] == e["checksum"]
        inst = catalog.instance(e)
        assert (inst.d, inst.m, inst.n_groups, inst.keep) == (e["d"], e["m"], e["p"], e["keep"])
        best = e["best"]
        assert best["status"] in ("optimal", "best-known")
        ev = oo.evaluate(inst, best["keep"], weights=False)
        assert ev.feasible and ev.err == pytest.approx(best["err"], abs=1e-12)
        if best.get("bound_err") is not None:
            assert best["bound_err"] <= best["err"] + 1e-9


def test_committed_crops_have_the_objective_of_the_real_crop(catalog):
    """Compact W (H^-1 F with F F' = G G') keeps every support's err: checked
    against the crop of a rebuilt layer when it is available."""
    e = catalog.entry("smollm2-l10-neurons-crop30-k15")
    inst = catalog.instance(e)
    assert "compact_w" in inst.meta and inst.m == inst.d
    full_entry = catalog.entry("smollm2-l10-neurons-k768")
    if not catalog.file_of(full_entry).exists():
        pytest.skip("the full layer is not built here: osscar-opt instances build --select smollm2-l10-neurons-k768")
    real = catalog.instance(full_entry).crop(inst.meta["crop_of"]["groups"], keep=15)
    rng = np.random.default_rng(0)
    for _ in range(5):
        S = np.sort(rng.choice(30, 15, replace=False))
        assert oo.evaluate(inst, S).err == pytest.approx(oo.evaluate(real, S).err, rel=1e-9)


def test_catalog_file_is_valid_json_with_the_documented_fields(catalog):
    data = json.loads(catalog.path.read_text())
    assert data["format"] == "osscar-catalog" and data["defaults"]["damping"] == 0.01
    for e in data["instances"][:5]:
        assert {"id", "tier", "model", "layer", "structure", "d", "m", "p", "group_size", "keep", "file",
                "recipe", "checksum", "best"} <= set(e)


def test_selection_and_errors(catalog):
    assert {e["tier"] for e in catalog.select("T0,T1")} == {"T0", "T1"}
    assert all(e["id"].startswith("smollm2-l10-") for e in catalog.select("smollm2-l10-*"))
    with pytest.raises(library.CatalogError, match="no catalog instance matches"):
        catalog.select("nothing-like-this")
    with pytest.raises(library.CatalogError, match="has no instance"):
        catalog.entry("nope")


def test_update_best_accepts_only_confirmed_improvements(catalog, tmp_path):
    copy = library.Catalog(tmp_path / "catalog.json", json.loads(catalog.path.read_text()))
    e = copy.entry("smollm2-l10-neurons-crop20-k10")
    inst = catalog.instance(e)
    best = dict(e["best"])
    worse = [g for g in range(20) if g not in best["keep"]][:10]
    assert not copy.update_best(e["id"], inst, worse, "test")
    assert not copy.update_best(e["id"], inst, best["keep"][:-1], "test")  # infeasible: one group short
    assert copy.entry(e["id"])["best"]["err"] == best["err"]


def test_instances_verify_reproduces_the_catalog_and_catches_a_wrong_record(catalog, tmp_path, capsys):
    """`osscar-opt instances verify` re-evaluates every recorded best support of the
    files present; a record or file that does not hold is reported and fails."""
    import shutil

    from osscar_opt.cli import main

    assert main(["instances", "verify", "--select", "T1"]) == 0
    out = capsys.readouterr().out
    assert "33 instances: 33 verified (33 with a certified optimum), 0 not built, 0 mismatched" in out
    # a copy of the catalog with the T1 files next to it: four records spoiled, one file corrupted
    data = json.loads(catalog.path.read_text())
    shutil.copytree(catalog.path.parent / "t1", tmp_path / "t1")
    by_id = {e["id"]: e for e in data["instances"]}
    by_id["smollm2-l10-neurons-crop30-k15"]["best"]["err"] *= 1.001  # not what the support gives
    by_id["smollm2-l0-neurons-crop30-k15"]["best"]["bound_err"] *= 1.01  # a bound above the optimum
    spoiled = by_id["smollm2-l5-neurons-crop40-k20"]
    spoiled["best"]["keep"] = spoiled["best"]["keep"][:-1]  # one group short
    by_id["smollm2-l25-neurons-crop30-k15"]["best"]["keep"][0] = 99  # a group the instance lacks
    (tmp_path / "catalog.json").write_text(json.dumps(data))
    with open(tmp_path / "t1" / "minilm-l0-neurons-crop30-k15.npz", "r+b") as fh:  # a corrupted file
        fh.seek(2000)
        fh.write(b"\xff" * 64)
    assert main(["instances", "verify", "--select", "T1", "--catalog", str(tmp_path / "catalog.json")]) == 1
    out = capsys.readouterr().out
    assert "smollm2-l10-neurons-crop30-k15: the recorded best err" in out and "re-evaluates to" in out
    assert "smollm2-l0-neurons-crop30-k15: the recorded lower bound" in out
    assert "smollm2-l5-neurons-crop40-k20: the recorded best support has 19 groups, not keep=20" in out
    assert "minilm-l0-neurons-crop30-k15: " in out
    assert "smollm2-l25-neurons-crop30-k15: the recorded best support is not one of this instance" in out
    assert "33 instances: 28 verified" in out and "5 mismatched" in out
    spoiled_catalog = library.Catalog.load(tmp_path / "catalog.json")
    rows = library.verify(spoiled_catalog, spoiled_catalog.select("T1"))
    assert {r["id"] for r in rows if r["state"] == "mismatch"} == {
        "smollm2-l10-neurons-crop30-k15", "smollm2-l0-neurons-crop30-k15", "smollm2-l5-neurons-crop40-k20",
        "minilm-l0-neurons-crop30-k15", "smollm2-l25-neurons-crop30-k15"}
