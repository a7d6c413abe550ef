"""The instance library: a catalog of benchmark instances from real models.

`instances/catalog.json` lists every benchmark instance (MIPLIB's `.solu`
idea): id, source model and layer, structure, sizes, tier, the file (for the
small committed tiers) or the recipe that rebuilds it, its checksum, and the
best-known err with its status (`optimal` / `best-known`) and the best proven
lower bound on err.

Tiers by the number of groups p: T0 p <= 20 (enumerable), T1 p <= 64,
T2 p <= 512 (crops of real layers, chosen deterministically), T3 full layers.
Instances are built from the embedded models with the model run in float64
on the pydoc calibration half (32 windows of 512 tokens), damping 0.01, so
that another machine reproduces the same err values to about 1e-9.

Committed files (T0/T1 crops) store an equivalent compact W: for a crop with
m > d output columns, W is replaced by W' = H^-1 F where F F' = G G'
(F square, d x d). Every support then has exactly the same objective and err
(DESIGN.md section 1: f depends on G only through G G'), but W' is no longer
the layer's weight matrix. Rebuilt files keep the real W.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import InstanceFileError, OsscarError
from .instance import DAMPING, Instance

ROOT = Path(__file__).resolve().parent.parent / "instances"
CATALOG = ROOT / "catalog.json"
BUILD_DIR = ROOT / "build"
TIERS = ("T0", "T1", "T2", "T3")
CALIBRATION = {"source": "pydoc", "split": "calibration", "windows": 32, "seq_len": 512, "seed": None}
MODEL_DTYPE = "float64"


class CatalogError(OsscarError, ValueError):
    """The catalog is missing, corrupt, or does not know an instance."""


def tier_of(p: int, crop: bool) -> str:
    if p <= 20:
        return "T0"
    if p <= 64:
        return "T1"
    if p <= 512 and crop:
        return "T2"
    return "T3"


def crop_groups(p: int, size: int, seed: int = 0) -> list[int]:
    """The deterministic crop of `size` groups out of p used by the library."""
    return sorted(np.random.default_rng(seed).choice(p, size, replace=False).tolist())


def compact(instance: Instance) -> Instance:
    """The same problem with W replaced by W' = H^-1 F, F F' = G G' (F d x d).

    Only shrinks the file when m > d; every support keeps its objective."""
    if instance.m <= instance.d:
        return instance
    G = instance.H @ instance.W
    R = np.linalg.qr(G.T, mode="r")  # G' = Q R, so G G' = R' R and F = R'
    F = R.T
    W2 = np.linalg.solve(instance.H, F)
    meta = dict(instance.meta)
    meta["compact_w"] = "W replaced by H^-1 F with F F' = G G' (same objective for every support)"
    return Instance(instance.H, W2, instance.keep, groups=instance.groups,
                    partition=instance.partition, meta=meta)


@dataclass
class Catalog:
    path: Path
    data: dict

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "Catalog":
        path = Path(path) if path is not None else CATALOG
        if not path.exists():
            raise CatalogError(f"no catalog at {path}: run `osscar-opt instances build` or check the path")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise CatalogError(f"{path} is not valid JSON ({exc}): restore it with `git checkout {path.name}`") from None
        if not isinstance(data, dict) or data.get("format") != "osscar-catalog":
            raise CatalogError(f"{path} is not an osscar catalog")
        return cls(path, data)

    @property
    def entries(self) -> list[dict]:
        return self.data["instances"]

    def entry(self, instance_id: str) -> dict:
        for e in self.entries:
            if e["id"] == instance_id:
                return e
        raise CatalogError(f"the catalog has no instance {instance_id!r}: see `osscar-opt instances list`")

    def select(self, selection: str | Sequence[str] | None = None) -> list[dict]:
        """Entries matching a selection: None/"all", tiers ("T0,T1"), ids or
        shell patterns of ids ("smollm2-135m-l10-*")."""
        from fnmatch import fnmatch

        if selection is None or selection == "all":
            return list(self.entries)
        items = selection.split(",") if isinstance(selection, str) else list(selection)
        out = []
        for e in self.entries:
            for item in items:
                item = item.strip()
                if item.upper() in TIERS and e["tier"] == item.upper() or fnmatch(e["id"], item):
                    out.append(e)
                    break
        if not out:
            raise CatalogError(f"no catalog instance matches {selection!r}: use a tier (T0..T3), an id or a pattern")
        return out

    def file_of(self, entry: dict, build_dir: Path | None = None) -> Path:
        if entry.get("file"):
            return self.path.parent / entry["file"]
        return Path(build_dir or self.path.parent / "build") / entry["build_file"]

    def instance(self, entry: dict | str, build_dir: Path | None = None) -> Instance:
        """Load an instance. Committed files must match the catalog checksum;
        rebuilt ones are derived from their shared file (keep set per entry)."""
        from .io import load_instance, read_header

        if isinstance(entry, str):
            entry = self.entry(entry)
        path = self.file_of(entry, build_dir)
        if not path.exists():
            raise InstanceFileError(
                f"{entry['id']} is not built yet ({path} missing): run `osscar-opt instances build --select {entry['id']}`"
            )
        if entry.get("file"):
            if entry.get("checksum") and read_header(path).get("checksum") != entry["checksum"]:
                raise InstanceFileError(
                    f"{path} does not match the catalog checksum for {entry['id']}: restore it with git or rebuild it"
                )
            return load_instance(path)
        base = load_instance(path)
        inst = base.with_keep(entry["keep"]) if base.keep != entry["keep"] else base
        return finish_instance(inst, entry["recipe"])

    def update_best(self, entry_id: str, instance: Instance, keep: Sequence[int], solver: str,
                    bound_err: float | None = None, proven: bool = False) -> bool:
        """Record a better support (or bound) after checking it with the evaluator.

        Returns True when the catalog changed. Never records an unconfirmed value.
        """
        from .evaluate import evaluate

        entry = self.entry(entry_id)
        ev = evaluate(instance, keep, weights=False)
        if not ev.feasible:
            return False
        best = entry.get("best") or {}
        changed = False
        tol = 1e-12
        if not best or ev.err < best.get("err", np.inf) - tol:
            best.update({"err": ev.err, "keep": ev.keep.tolist(), "solver": solver,
                         "status": "best-known"})
            changed = True
        if bound_err is not None and np.isfinite(bound_err):
            bound_err = max(0.0, float(bound_err))
            if bound_err <= best["err"] + 1e-9 and bound_err > best.get("bound_err", -np.inf) + tol:
                best["bound_err"] = bound_err
                changed = True
        if proven and abs(ev.err - best["err"]) <= 1e-9:
            if best.get("status") != "optimal":
                best["status"] = "optimal"
                best["bound_err"] = best["err"]
                changed = True
        if best.get("bound_err") is not None and best["err"] - best["bound_err"] <= 1e-9 * max(best["err"], 1e-12):
            if best.get("status") != "optimal":
                best["status"] = "optimal"
                changed = True
        entry["best"] = best
        return changed

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


def verify(catalog: Catalog, entries: Sequence[dict], build_dir: Path | None = None,
           tol: float = 1e-9) -> list[dict]:
    """Check the files and recorded results of catalog entries without rebuilding anything.

    Per entry: the file is present and loads (committed files: their catalog
    checksum), the recorded best support has `keep` groups and its err,
    recomputed by the fp64 evaluator, equals the recorded err within `tol`
    (relative to max(err, 1)), the recorded lower bound does not exceed it,
    and "optimal" entries carry a bound equal to it. A rebuilt file whose
    instance is not the catalogued one bit for bit (another torch or BLAS can
    round the Gram matrices differently) gets a note, and passes only if the
    err check holds. Returns one row per entry: id, tier, state ("ok", "not
    built" or "mismatch"), problems, notes, the recomputed err and the gap.
    """
    from .evaluate import evaluate
    from .io import instance_checksum

    rows = []
    for entry in entries:
        row = {"id": entry["id"], "tier": entry["tier"], "state": "ok", "problems": [], "notes": [], "err": None,
               "gap": None}
        rows.append(row)
        if not catalog.file_of(entry, build_dir).exists():
            row["state"] = "not built"
            continue
        try:
            inst = catalog.instance(entry, build_dir)
        except OsscarError as exc:
            row["state"], row["problems"] = "mismatch", [str(exc)]
            continue
        problems = row["problems"]
        if not entry.get("file") and entry.get("checksum") and instance_checksum(inst) != entry["checksum"]:
            row["notes"].append("rebuilt, not bit for bit the catalogued instance (checksum)")
        best = entry.get("best") or {}
        if best.get("keep") is not None:
            try:
                ev = evaluate(inst, best["keep"], weights=False)
            except OsscarError as exc:  # ids out of range, duplicates, not integers
                problems.append(f"the recorded best support is not one of this instance: {exc}")
                ev = None
        if best.get("keep") is not None and ev is not None:
            row["err"] = ev.err
            scale = max(abs(best["err"]), 1.0)
            if len(best["keep"]) != inst.keep or not ev.feasible:
                problems.append(f"the recorded best support has {len(best['keep'])} groups, not keep={inst.keep}")
            elif abs(ev.err - best["err"]) > tol * scale:
                problems.append(f"the recorded best err {best['err']:.12g} re-evaluates to {ev.err:.12g}")
        bound = best.get("bound_err")
        if bound is not None and "err" in best:
            row["gap"] = (best["err"] - bound) / best["err"] if best["err"] > 0 else 0.0
            if bound > best["err"] + tol * max(abs(best["err"]), 1.0):
                problems.append(f"the recorded lower bound {bound:.12g} exceeds the best err {best['err']:.12g}")
        if best.get("status") == "optimal" and (bound is None or best["err"] - bound > tol * max(best["err"], 1.0)):
            problems.append("marked optimal without a matching lower bound")
        if problems:
            row["state"] = "mismatch"
    return rows


def write_json_atomic(path: Path, obj: Any) -> None:
    from .io import atomic_write_json

    atomic_write_json(path, obj)


# ------------------------------------------------------------------ recipes
def default_recipes() -> list[dict]:
    """Every benchmark instance of the library, as a build recipe."""
    recipes = []

    def add(model, layer, structure, keep, crop=None, partition=False):
        recipes.append({"model": model, "layer": layer, "structure": structure, "keep": keep,
                        "crop": crop, "partition": partition})

    # SmolLM2-135M: 30 layers, 1536 FFN neurons, 9 query heads in 3 KV groups
    for layer in range(30):
        for keep in (384, 768, 1152):
            add("smollm2-135m", layer, "neurons", keep)
        for keep in (2, 4, 7):  # 25/50/75% of 9 heads, no side constraint
            add("smollm2-135m", layer, "heads", keep)
        for keep in (3, 6):  # the same number of heads in every KV group (valid GQA)
            add("smollm2-135m", layer, "heads", keep, partition=True)
    # all-MiniLM-L6-v2: 6 layers, 1536 neurons, 12 heads
    for layer in range(6):
        for keep in (384, 768, 1152):
            add("minilm-l6", layer, "neurons", keep)
        for keep in (3, 6, 9):
            add("minilm-l6", layer, "heads", keep)
    # crops of FFN layers at keep = half, chosen deterministically
    for layer in (0, 5, 10, 15, 20, 25, 29):
        for size in (16, 20, 30, 40, 60, 100, 200, 512):
            add("smollm2-135m", layer, "neurons", size // 2, crop={"size": size, "seed": 0})
    for layer in range(6):
        for size in (20, 30, 60, 100):
            add("minilm-l6", layer, "neurons", size // 2, crop={"size": size, "seed": 0})
    return recipes


def recipe_id(r: dict) -> str:
    short = {"smollm2-135m": "smollm2", "minilm-l6": "minilm"}[r["model"]]
    structure = "gqa-heads" if r["partition"] else r["structure"]
    crop = f"-crop{r['crop']['size']}" if r["crop"] else ""
    return f"{short}-l{r['layer']}-{structure}{crop}-k{r['keep']}"


def _instance_from(base: Instance, recipe: dict, p_full: int) -> Instance:
    if recipe["crop"]:
        groups = crop_groups(p_full, recipe["crop"]["size"], recipe["crop"]["seed"])
        inst = base.without_partition().crop(groups, keep=recipe["keep"])
        inst.meta["crop_of"] = {"groups": groups, "source": f"{recipe['model']}:{base.meta.get('module')}"}
    elif recipe["partition"]:
        inst = base.with_keep(recipe["keep"])
    else:
        inst = base.without_partition().with_keep(recipe["keep"])
    return inst


def base_name(recipe: dict) -> str:
    """File stem shared by the keep variants of one rebuilt (layer, structure)."""
    return recipe_id({**recipe, "keep": "all"}).replace("-kall", "")


def build(recipes: Iterable[dict], out_dir: Path | None = None, commit_dir: Path | None = None,
          progress: bool = True, device: Any = None) -> list[tuple[dict, Path, Instance]]:
    """Extract and write the instances of `recipes`; returns (recipe, path, instance).

    Committed tiers (T0/T1 crops) get one compact file each under `commit_dir`;
    the keep variants of a rebuilt (layer, structure) share one file in `out_dir`.
    """
    import torch

    from . import data, models
    from .extract import extract
    from .io import save_instance

    out_dir = Path(out_dir or BUILD_DIR)
    commit_dir = Path(commit_dir or ROOT)
    recipes = list(recipes)
    results = []
    for model_name in dict.fromkeys(r["model"] for r in recipes):
        mine = [r for r in recipes if r["model"] == model_name]
        model, tok = models.load(model_name, dtype=getattr(torch, MODEL_DTYPE))
        cal = data.calibration(tok, CALIBRATION["source"], CALIBRATION["windows"], CALIBRATION["seq_len"])
        layers = sorted({r["layer"] for r in mine})
        structures = sorted({r["structure"] for r in mine})
        bases = extract(model, cal, structures=structures, layers=layers, damping=DAMPING, keep=0.5,
                        progress=progress, model_name=model_name, device=device)
        by_site = {(b.meta["layer"], b.meta["structure"]): b for b in bases}
        written: set[Path] = set()
        for r in mine:
            base = by_site[(r["layer"], r["structure"])]
            inst = finish_instance(_instance_from(base, r, base.n_groups), r)
            if is_committed(r, inst):
                inst = compact(inst)
                path = commit_dir / inst.meta["tier"].lower() / f"{inst.meta['id']}.npz"
                save_instance(inst, path)
            else:
                path = out_dir / f"{base_name(r)}.npz"
                if path not in written:
                    save_instance(inst, path)
                    written.add(path)
            results.append((r, path, inst))
        del model, bases, by_site
    return results


def finish_instance(inst: Instance, recipe: dict) -> Instance:
    """Set the library's identity fields of an instance built from `recipe`."""
    inst.meta["id"] = recipe_id(recipe)
    inst.meta["tier"] = tier_of(inst.n_groups, bool(recipe["crop"]))
    inst.meta["model_dtype"] = MODEL_DTYPE
    inst.meta.pop("keep_fraction", None)
    return inst


def is_committed(recipe: dict, inst: Instance) -> bool:
    return bool(recipe["crop"]) and inst.meta["tier"] in ("T0", "T1")


def entry_for(recipe: dict, path: Path, inst: Instance, root: Path) -> dict:
    from .io import instance_checksum

    committed = is_committed(recipe, inst)
    return {
        "id": inst.meta["id"],
        "tier": inst.meta["tier"],
        "model": recipe["model"],
        "layer": recipe["layer"],
        "structure": "gqa-heads" if recipe["partition"] else recipe["structure"],
        "module": inst.meta.get("module"),
        "d": inst.d, "m": inst.m, "p": inst.n_groups, "group_size": inst.group_size, "keep": inst.keep,
        "file": str(path.relative_to(root)) if committed else None,
        "build_file": None if committed else path.name,
        "recipe": recipe,
        "checksum": instance_checksum(inst),
        "best": None,
    }
