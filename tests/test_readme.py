"""The README's Python examples run as written (the whole-model one up to its
imports here; the default end-to-end test runs the same driver on SmolLM2)."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_one_layer_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes layer.npz
    block = _python_blocks()[0]
    scope: dict = {}
    exec(compile(block, "README.md (one layer)", "exec"), scope)
    inst, sol, exact = scope["inst"], scope["sol"], scope["exact"]
    assert (tmp_path / "layer.npz").exists() and inst.keep == 8 and sol.keep.size == 8
    assert exact.status.name == "OPTIMAL" and 0.0 <= exact.gap <= 1e-12 and exact.err <= sol.err + 1e-12  # fp64 round-off
    assert np.isfinite(float(capsys.readouterr().out.split()[-1]))


def test_the_whole_model_example_imports_what_it_calls():
    block = _python_blocks()[1]
    imports = "\n".join(line for line in block.splitlines() if line.startswith(("from ", "import ")))
    scope: dict = {}
    exec(compile(imports, "README.md (whole model, imports)", "exec"), scope)
    for name in ("apply", "evaluate_model", "save_pruned"):
        assert callable(scope[name]), name
    for name, attr in (("data", "calibration"), ("models", "load")):
        assert callable(getattr(scope[name], attr)), (name, attr)
    called = set(re.findall(r"^\s*(?:\w+(?:, \w+)* = )?(\w+)\(", block, re.M))
    assert called <= set(scope) | {"print"}, called - set(scope)
