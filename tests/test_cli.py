import json
import subprocess
import sys

import pytest

import osscar_opt as oo
from osscar_opt.cli import main

from conftest import random_instance


@pytest.fixture
def inst_file(tmp_path, rng):
    inst = random_instance(rng, p=10, group_size=2, keep=5, m=4)
    inst.meta["id"] = "cli-test"
    return oo.save_instance(inst, tmp_path / "cli.npz")


def test_solve_json_reports_the_evaluated_solution(inst_file, tmp_path, capsys):
    out = tmp_path / "sol.json"
    assert main(["solve", str(inst_file), "--sparsity", "0.7", "--json", "--out", str(out), "-p", "swap_size=2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(out.read_text())
    assert printed["keep"] == saved["keep"] and len(printed["keep"]) == 3
    inst = oo.load_instance(inst_file).with_keep(3)
    assert printed["err"] == pytest.approx(oo.evaluate(inst, printed["keep"]).err, rel=1e-12)
    assert printed["params"]["swap_size"] == 2 and printed["status"] == "FEASIBLE"


def test_a_file_system_refusal_is_one_line_not_a_traceback(inst_file, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv in (["solve", str(inst_file), "--out", str(blocker / "sol.json")],
                 ["export-mps", str(inst_file), str(blocker / "layer.mps")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("osscar-opt: error: ") and str(blocker) in err and err.count("\n") == 1, err


def test_solve_with_exact_solver_prints_the_certificate(inst_file, capsys):
    assert main(["solve", str(inst_file), "--solver", "enumerate", "--keep", "4"]) == 0
    text = capsys.readouterr().out
    assert "status OPTIMAL" in text and "certified gap 0.0000%" in text


def test_info_and_solvers(inst_file, capsys):
    assert main(["info", str(inst_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["groups"] == 10 and info["meta"]["id"] == "cli-test"
    assert main(["solvers", "--json"]) == 0
    names = [row["name"] for row in json.loads(capsys.readouterr().out)]
    assert "osscar" in names and "enumerate" in names


def test_errors_are_one_line_with_exit_code_2(inst_file, tmp_path, capsys):
    assert main(["solve", str(tmp_path / "none.npz")]) == 2
    assert main(["solve", str(inst_file), "--keep", "50"]) == 2
    assert main(["solve", str(inst_file), "-p", "nope=1"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("osscar-opt: error: ") for line in errors)
    assert "out of range" in errors[1] and "no parameter 'nope'" in errors[2]


def test_console_script_runs(inst_file):
    result = subprocess.run(
        [sys.executable, "-m", "osscar_opt", "solve", str(inst_file), "--keep", "2", "--json"],
        capture_output=True, text=True, check=True,
    )
    assert len(json.loads(result.stdout)["keep"]) == 2


def test_bench_speed_merges_its_rows_with_other_machines(tmp_path, capsys):
    """Rows measured elsewhere (another machine, device or dtype) survive a rerun;
    the rows of this run replace their own earlier versions."""
    import json

    other = {"instance": "synthetic-d64", "d": 64, "m": 16, "keep": 32, "device": "cuda:0", "dtype": "float64",
             "greedy_seconds": 0.001, "total_seconds": 0.002, "err": 0.01, "greedy_err": 0.011, "repeats": 3,
             "single_swaps": 2, "multi_swaps": 0, "peak_cpu_rss_gb": 1.0, "peak_cuda_gb": 0.1,
             "machine": "elsewhere, GPU X", "machine_short": "X"}
    (tmp_path / "speed.json").write_text(json.dumps({"rows": [other]}))
    args = ["bench-speed", "--device", "cpu", "--sizes", "64,96", "--no-layer", "--repeats", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 0
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    here = next(r["machine_short"] for r in rows if r["machine_short"] != "X")
    assert sorted((r["instance"], r["machine_short"]) for r in rows) == sorted(
        [("synthetic-d64", "X"), ("synthetic-d64", here), ("synthetic-d96", here)])
    md = (tmp_path / "speed.md").read_text()
    assert "elsewhere, GPU X" in md and "| synthetic-d96 | 96 | 24 |" in md
    assert (tmp_path / "speed.png").stat().st_size > 0
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]  # no temporary left


def test_prune_heads_flag_goes_to_the_attention_structure_chosen():
    import argparse

    from osscar_opt.prune_cli import _sparsity

    chosen = argparse.Namespace(heads=0.25, neurons=None, structures="query-heads,neurons")
    assert _sparsity(chosen, 0.5) == {"default": 0.5, "query-heads": 0.25}
    default = argparse.Namespace(heads=0.25, neurons=0.5, structures=None)
    assert _sparsity(default, 0.3) == {"default": 0.3, "heads": 0.25, "neurons": 0.5}
    assert _sparsity(argparse.Namespace(heads=None, neurons=None, structures=None), 0.3) == 0.3


def test_target_damping_flag_takes_a_ridge_or_validated(capsys):
    from osscar_opt.cli import main, target_damping

    assert target_damping("validated") is None and target_damping("0.3") == 0.3
    for command in ("prune", "bench-prune"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--target-damping", "strong"])
        assert exit_.value.code == 2
        assert "a number like 0.1 or 'validated', got 'strong'" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main([command, "--target-damping", "-1"])
        assert "a finite number >= 0 or 'validated', got '-1'" in capsys.readouterr().err


def test_prune_refuses_a_bad_solver_or_calibration_file_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from osscar_opt import models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load", no_load)
    binary = tmp_path / "calib.txt"
    binary.write_bytes(bytes(range(128, 256)))
    foreign = tmp_path / "foreign"
    (foreign / "model").mkdir(parents=True)
    cases = [(["--solver", "no-such-solver"], "unknown solver 'no-such-solver'"),
             (["--calib", str(tmp_path / "missing.txt")], "no text file at"),
             (["--calib", str(binary)], "is not UTF-8 text"),
             (["--sweep", "0.1,half"], "--sweep takes comma-separated sparsities in [0, 1)"),
             (["--sweep", "0.2,1.0"], "got '1.0'"),
             (["--out", str(binary)], "is a file: give a folder"),
             (["--out", str(binary / "sub")], "cannot write to --out"),
             (["--out", str(foreign)], "model exists and was not written by `osscar-opt prune`"),
             (["--heads", "1.5"], "--heads is the fraction of groups pruned, in [0, 1); got 1.5"),
             (["--nsamples", "0"], "--nsamples must be at least 1, got 0"),
             (["--damping", "-0.1"], "damping must be a finite number >= 0")]
    for extra, message in cases:
        assert main(["prune", "--model", "smollm2-135m", "--sparsity", "0.5", "--out", str(tmp_path / "o"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in foreign.iterdir()) == ["model"]
    with pytest.raises(SystemExit):
        main(["prune", "--calib-seed", "-3"])
    assert "--calib-seed: a non-negative integer, got '-3'" in capsys.readouterr().err


def test_every_command_that_writes_results_checks_its_flags_and_out_folder_first(tmp_path, capsys, monkeypatch):
    """An unwritable --out or a malformed list is refused before any model is loaded or any work done."""
    from osscar_opt import library, models

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(models, "load", no_work)
    monkeypatch.setattr(library, "build", no_work)
    monkeypatch.setattr(subprocess, "run", no_work)  # bench-extract measures in child processes
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad_out = str(blocker / "out")
    cases = [
        (["bench-prune", "--out", bad_out], "cannot write to --out"),
        (["bench-prune", "--sparsities", "0.1,abc"], "--sparsities takes comma-separated sparsities in [0, 1)"),
        (["bench-prune", "--nsamples", "0"], "--nsamples must be at least 1, got 0"),
        (["bench-prune", "--dampings", "0.01,-1"], "damping must be a finite number >= 0"),
        (["bench-speed", "--sizes", "64", "--out", bad_out], "cannot write to --out"),
        (["bench-extract", "--windows", "16,a"], "--windows takes comma-separated positive integers"),
        (["bench-extract", "--out", bad_out], "cannot write to --out"),
        (["bench-reference", "--out", bad_out], "cannot write to --out"),
        (["instances", "build", "--select", "T0", "--out", bad_out], "cannot write to --out"),
        (["prune", "--out", str(blocker)], "is a file: give a folder"),
        (["solve", str(tmp_path / "none.npz"), "--out", str(blocker / "s.json")], "the folder of --out " + str(blocker) + " is a file"),
        (["solve", str(tmp_path / "none.npz"), "--out", bad_out + "/s.json"], "cannot write to the folder of --out"),
        (["solve", str(tmp_path / "none.npz"), "--out", str(tmp_path)], "is a folder: give a file name"),
        (["prune", "--device", "gpu"], "--device gpu: use cpu, cuda or cuda:N"),
        (["prune", "--compare", "obs-greedy,nope"], "nope"),
        (["prune", "--solver", "heads=osscar,neurons=nope"], "nope"),
        (["prune", "--model", "minilm-l6", "--select", "loss"], "minilm-l6 is an encoder: leave --select out"),
        (["bench-prune", "--model", "minilm-l6", "--select", "loss"], "minilm-l6 is an encoder: leave --select out"),
        (["prune", "--validation-windows", "8"], "--validation-windows belongs to --select validation"),
        (["prune", "--validate", "neurons"], "--validate belongs to --select validation"),
        (["bench-prune", "--validate", "neurons"], "--validate belongs to --select validation"),
        (["prune", "--select", "validation", "--validation-windows", "0"], "at least one held-out window"),
        (["bench-prune", "--select", "validation"], "give validation_windows (--validation-windows 40)"),
        (["prune", "--solver", "default=osscar,heads[0]=nope"], "nope"),
        (["prune", "--solver", "heads=osscar,neurons=obs-greedy", "-p", "swap_sized=2"], "swap_sized"),
        (["bench-prune", "--solvers", "osscar,heads=osscar+neurons"], "STRUCTURE=SOLVER"),
        (["bench-speed", "--device", "cpu", "--device", "cuda:x"], "--device cuda:x: use cpu, cuda or cuda:N"),
    ]
    import torch

    for command in ("prune", "bench-prune", "bench-extract", "bench-reference", "instances build", "solve x.npz"):
        if not torch.cuda.is_available():  # a CPU build of torch: every command refuses --device cuda up front
            cases.append(([*command.split(), "--device", "cuda"], "--device cuda: torch.cuda.is_available() is False"))
        else:  # a GPU machine: a device index it lacks is refused up front
            cases.append(([*command.split(), "--device", "cuda:99"], "--device cuda:99: this machine has"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        main(["bench-prune", "--validation-windows", "-2"])
    assert "a non-negative integer, got '-2'" in capsys.readouterr().err
    from osscar_opt.registry import device_problem

    assert device_problem("cpu") is None and device_problem("cpu:0") is None  # torch's own spellings
    assert device_problem("tpu") == device_problem("cuda:x") == "use cpu, cuda or cuda:N"


def test_bench_supports_measures_every_feasible_support_once_and_ranks_the_criteria(tmp_path):
    """A small Llama (4 query heads in 2 KV groups; one head kept per group at
    50%): the 4 feasible supports are each measured once; the exact solver's
    pick is the support of least err; a rerun measures nothing again, and
    other settings are refused rather than mixed into the same file."""
    import torch

    from osscar_opt.apply import PruneError
    from osscar_opt.benchmarks import supports
    from osscar_opt.evaluation import perplexity
    from small_models import random_tokens, tiny_llama

    torch.manual_seed(0)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cal, val, ev = (random_tokens(n, 32, seed=s) for n, s in ((8, 0), (4, 1), (4, 2)))
    log = tmp_path / "supports.jsonl"
    summary = supports.measure(model, cal, ev, val, layer=1, structure="heads", sparsity=0.5, log=log,
                               loss_windows=2, solvers=("enumerate", "magnitude"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the dense model is untouched
    rows = [r for r in supports._rows(log) if r.get("support") is not None]
    assert sorted(tuple(r["support"]) for r in rows) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    least_err = min(rows, key=lambda r: r["err"])
    assert summary["picked"]["enumerate"]["support"] == least_err["support"] == summary["picked"]["err"]["support"]
    best = min(r["perplexity"] for r in rows)
    assert summary["picked"]["best on the evaluation half"]["perplexity"] == best
    assert all(-1.0 <= v <= 1.0 for v in summary["spearman"].values())
    assert set(summary["spearman"]) == {"err", "validation_err", "calibration_loss", "calibration_kl",
                                        "crossfit_loss", "loss_estimate", "validation_perplexity"}
    assert all(r["calibration_kl"] > 0.0 for r in rows)  # every support moves the model on the calibration windows
    # the held-out score of the refit weights, applied to the calibration instance itself, is the err
    from osscar_opt.evaluate import evaluate
    from osscar_opt.extract import extract

    (inst,) = extract(model, cal, structures=("heads",), layers=[1], keep=0.5, progress=False)
    for r in rows:
        assert supports.held_out_err(inst, evaluate(inst, r["support"]).weights) == pytest.approx(r["err"], rel=1e-9)
    # the estimated loss change is what apply(select="loss") minimizes over the same supports
    from osscar_opt.loss_select import choose_by_loss, loss_curvature

    curv = loss_curvature(model, [inst.meta["module"]], [cal])[inst.meta["module"]]
    choice = choose_by_loss(inst, rows[0]["support"], curv)
    assert summary["picked"]["loss_estimate"]["support"] == choice.keep.tolist()
    assert min(r["loss_estimate"] for r in rows) == pytest.approx(choice.estimate, rel=1e-6)
    assert perplexity(model, ev) == supports._rows(log)[0]["dense_perplexity"]
    text = log.with_suffix(".md").read_text()
    assert "| layer err (the solvers' objective) |" in text and text.count("\n| [") == 4

    lines = log.read_text()
    supports.measure(model, cal, ev, val, layer=1, structure="heads", sparsity=0.5, log=log, loss_windows=2,
                     solvers=())
    assert log.read_text() == lines  # nothing measured twice
    # a file from before the calibration KL: a rerun adds it to every row, and only that
    old = [{k: v for k, v in r.items() if k != "calibration_kl"} for r in supports._rows(log)]
    log.write_text("".join(json.dumps(r) + "\n" for r in old))
    supports.measure(model, cal, ev, val, layer=1, structure="heads", sparsity=0.5, log=log, loss_windows=2,
                     solvers=())
    added = supports._rows(log)[len(old):]
    assert sorted(tuple(r["support"]) for r in added) == sorted(tuple(r["support"]) for r in rows)
    assert all(set(r) == {"support", "calibration_kl"} for r in added)
    merged = supports._supports(log)
    for r in rows:
        assert merged[tuple(r["support"])]["calibration_kl"] == pytest.approx(r["calibration_kl"], rel=1e-6)
    # and one from before the cross-fitted loss and the loss estimate: only those are added, with the same values
    late = ("crossfit_loss", "loss_estimate")
    old = [{k: v for k, v in r.items() if k not in late} for r in supports._rows(log)]
    log.write_text("".join(json.dumps(r) + "\n" for r in old))
    supports.measure(model, cal, ev, val, layer=1, structure="heads", sparsity=0.5, log=log, loss_windows=2,
                     solvers=())
    added = supports._rows(log)[len(old):]
    assert len(added) == 4 and all(set(r) == {"support", *late} for r in added)
    merged = supports._supports(log)
    for r in rows:
        for key in late:
            assert merged[tuple(r["support"])][key] == pytest.approx(r[key], rel=1e-6, abs=1e-12)
    lines = log.read_text()
    supports.measure(model, cal, ev, val, layer=1, structure="heads", sparsity=0.5, log=log, loss_windows=2,
                     solvers=())
    assert log.read_text() == lines
    # calibration made of the same 4 windows twice: each half's refit is the whole one's, scored on those same
    # windows, so the cross-fitted loss is the calibration loss on them
    twice = torch.cat([cal[:4], cal[:4]])
    supports.measure(model, twice, ev, None, layer=1, structure="heads", sparsity=0.5, log=tmp_path / "t.jsonl",
                     loss_windows=4, solvers=())
    for r in supports._supports(tmp_path / "t.jsonl").values():
        assert r["crossfit_loss"] == pytest.approx(r["calibration_loss"], rel=1e-5)
    with pytest.raises(PruneError, match="measured with other settings"):
        supports.measure(model, cal, ev, None, layer=1, structure="heads", sparsity=0.5, log=log, loss_windows=2)
    with pytest.raises(PruneError, match="more than max_supports=3"):
        supports.measure(model, cal, ev, val, layer=1, structure="heads", sparsity=0.5, log=tmp_path / "x.jsonl",
                         max_supports=3)
    assert not (tmp_path / "x.jsonl").exists()
