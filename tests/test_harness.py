"""The comparison harness (`osscar-opt bench`) and its report, with real solvers
running in real worker processes on small random instances."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

import osscar_opt as oo
from osscar_opt import harness, report
from osscar_opt.cli import main
from osscar_opt.io import read_header

from conftest import random_activations

SOLVERS = "osscar,enumerate,magnitude"
ENUMERATE = "enumerate[max_supports=1000]"


def make_instance(rng, p, keep, instance_id, group_size=1, m=6):
    d = p * group_size
    X = random_activations(rng, 300, d)
    inst = oo.Instance.from_activations(X, rng.standard_normal((d, m)), keep, group_size=group_size)
    inst.meta.update(id=instance_id, tier="T0")
    return inst


def all_errs(inst):
    return {S: oo.evaluate(inst, list(S), weights=False).err for S in itertools.combinations(range(inst.n_groups), inst.keep)}


def entry(root, path, inst, best):
    return {"id": inst.meta["id"], "tier": "T0", "model": "random", "layer": 0, "structure": "neurons",
            "d": inst.d, "m": inst.m, "p": inst.n_groups, "group_size": inst.group_size, "keep": inst.keep,
            "file": str(path.relative_to(root)), "build_file": None, "recipe": None,
            "checksum": read_header(path)["checksum"], "best": best}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A two-instance catalog: 'small' (70 supports, enumerable under max_supports=1000)
    records a poor best support; 'large' (3432 supports, so enumerate skips it)
    already records its true optimum."""
    root = tmp_path_factory.mktemp("library")
    rng = np.random.default_rng(11)
    small = make_instance(rng, 8, 4, "rand-small-k4")
    large = make_instance(rng, 14, 7, "rand-large-k7", group_size=2)
    files = {}
    for inst in (small, large):
        files[inst.meta["id"]] = oo.save_instance(inst, root / "t0" / f"{inst.meta['id']}.npz")
    errs_small = all_errs(small)
    worst = max(errs_small, key=errs_small.get)
    opt = oo.solve(large, "enumerate", device="cpu")
    assert opt.status == oo.Status.OPTIMAL
    opt_large, errs_large = tuple(opt.keep.tolist()), {tuple(opt.keep.tolist()): opt.err}
    catalog = {"format": "osscar-catalog", "version": 1, "instances": [
        entry(root, files[small.meta["id"]], small,
              {"err": errs_small[worst], "keep": list(worst), "solver": "worst", "status": "best-known"}),
        entry(root, files[large.meta["id"]], large,
              {"err": errs_large[opt_large], "keep": list(opt_large), "solver": "brute", "status": "optimal",
               "bound_err": errs_large[opt_large]}),
    ]}
    path = root / "catalog.json"
    path.write_text(json.dumps(catalog, indent=1))
    return {"root": root, "catalog": path, "small": small, "large": large, "files": files,
            "optimum_small": min(errs_small.values()), "before": json.loads(path.read_text())}


@pytest.fixture(scope="module")
def bench_run(library, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "t0"
    code = main(["bench", "--instances", "T0", "--catalog", str(library["catalog"]), "--solvers", SOLVERS,
                 "-p", "enumerate.max_supports=1000", "--time-limit", "20", "--jobs", "2",
                 "--out", str(out), "--update-catalog", "--quiet"])
    assert code == 0
    return out


def test_every_pair_gets_one_row_with_evaluated_numbers(library, bench_run):
    rows = harness.read_rows(bench_run)
    keys = [(r["instance"], r["label"]) for r in rows]
    assert sorted(keys) == sorted(itertools.product(["rand-small-k4", "rand-large-k7"],
                                                    ["osscar", ENUMERATE, "magnitude"]))
    by = {k: r for k, r in zip(keys, rows)}
    skipped = by[("rand-large-k7", ENUMERATE)]
    assert skipped["status"] == "SKIPPED" and "max_supports" in skipped["reason"]
    exact = by[("rand-small-k4", ENUMERATE)]
    assert exact["status"] == "OPTIMAL" and exact["gap"] <= 1e-12
    assert exact["err"] == pytest.approx(library["optimum_small"], rel=1e-12)
    insts = {"rand-small-k4": library["small"], "rand-large-k7": library["large"]}
    for r in rows:
        if r["status"] == "SKIPPED":
            continue
        inst = insts[r["instance"]]
        ev = oo.evaluate(inst, r["support"], weights=False)
        assert ev.feasible and len(r["support"]) == r["keep"] == inst.keep
        assert r["err"] == pytest.approx(ev.err, rel=1e-12, abs=1e-15)
        assert r["objective"] == pytest.approx(ev.objective, rel=1e-12)
        assert r["time_limit"] == 20.0 and r["tier"] == "T0" and r["p"] == inst.n_groups
        assert 0 < r["seconds"] < r["wall_seconds"] and r["peak_rss_mb"] > 10
        assert "numpy" in r["versions"] and r["machine"]["cores"] >= 1 and r["osscar_opt"] == oo.__version__
        assert r["best_known"]["err"] == library["before"]["instances"][0 if inst is library["small"] else 1]["best"]["err"]


def test_catalog_update_records_only_confirmed_improvements(library, bench_run, tmp_path):
    after = json.loads(library["catalog"].read_text())
    small, large = after["instances"]
    # the poor recorded support of 'small' was replaced by the proven optimum
    assert small["best"]["err"] == pytest.approx(library["optimum_small"], rel=1e-12)
    assert small["best"]["status"] == "optimal" and small["best"]["solver"] == "enumerate"
    # 'large' already held its optimum: nothing from the heuristics touched it
    assert large == library["before"]["instances"][1]

    # forged rows: an infeasible support claiming err 0, and a real support with an understated err
    forged = tmp_path / "forged"
    shutil.copytree(bench_run, forged)
    rows = harness.read_rows(forged)
    base = next(r for r in rows if r["instance"] == "rand-large-k7" and r["label"] == "magnitude")
    lies = [dict(base, label="liar-size", support=base["support"][:-1], err=0.0, status="OPTIMAL"),
            dict(base, label="liar-err", err=base["err"] / 10)]
    with open(forged / harness.RUNS, "a") as fh:
        for lie in lies:
            fh.write(json.dumps(lie) + "\n")
    result = harness.update_catalog_from(forged, library["catalog"])
    assert result.catalog_changes == [] and len(result.catalog_rejected) == 2
    assert json.loads(library["catalog"].read_text()) == after


def test_report_writes_tables_and_plots(library, bench_run):
    assert main(["report", str(bench_run)]) == 0
    text = (bench_run / "report.md").read_text()
    assert "## Tier T0 (2 instances)" in text and "## Skipped" in text
    # enumerate: 1 run, proved 1 optimum, 1 skipped
    assert f"| `{ENUMERATE}` | 1 | 1 | 0 | 0 | 0 | 1 |" in text
    for name in report.PLOTS:
        data = (bench_run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    rows = harness.read_rows(bench_run)
    ratios = report.profile_ratios(rows, lambda r: r["status"] == "OPTIMAL")
    order = list(dict.fromkeys(r["instance"] for r in rows))
    proved = ratios[ENUMERATE][order.index("rand-small-k4")]
    assert proved == 1.0 and math.isinf(ratios[ENUMERATE][order.index("rand-large-k7")])
    assert all(math.isinf(v) for v in ratios["magnitude"])


def test_report_tabulates_the_recorded_progress_traces(library, tmp_path):
    out = tmp_path / "traced"
    code = main(["bench", "--instances", "T0", "--catalog", str(library["catalog"]), "--solvers", "bnb,osscar",
                 "--time-limit", "20", "--jobs", "1", "--out", str(out), "--quiet"])
    assert code == 0
    rows = {r["label"]: r for r in harness.read_rows(out) if r["instance"] == "rand-large-k7"}
    trace = rows["bnb"]["info"]["trace"]  # kept whole in the row (other long lists are elided)
    assert len(trace) >= 1 and trace[-1][1] == pytest.approx(rows["bnb"]["err"], rel=1e-9)
    assert "trace" not in rows["osscar"]["info"]
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Certified gap over time" in text
    section = text.split("## Certified gap over time")[1].split("## ")[0]
    line = next(ln for ln in section.splitlines() if ln.startswith("| T0 | `bnb` | 2 |"))
    assert line.endswith("| 0 |")  # both proven by the end: median gap 0 at the time limit
    assert report.gap_at([(0.5, 0.2), (2.0, 0.0)], 0.1) == 1.0
    assert report.gap_at([(0.5, 0.2), (2.0, 0.0)], 1.0) == 0.2


def test_resume_after_a_killed_bench(library, tmp_path):
    out = tmp_path / "resume"
    files = [str(f) for f in library["files"].values()]
    args = ["bench", "--instances", *files, "--solvers", "osscar,magnitude", "--time-limit", "20",
            "--jobs", "1", "--out", str(out), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "osscar_opt", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not harness.read_rows(out):
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        workers = psutil.Process(proc.pid).children(recursive=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    time.sleep(0.3)
    # the workers die with the bench (parent-death signal): no orphan keeps running
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    first = harness.read_rows(out)
    assert 1 <= len(first) < 4
    with open(out / harness.RUNS, "a") as fh:  # what a writer killed mid-line leaves
        fh.write('{"schema": 1, "instance": "rand-small-k4", "label": "osscar", "sta')
    assert main([*args, "--jobs", "2"]) == 0  # the last --jobs wins; jobs do not change the runs
    rows = harness.read_rows(out)
    keys = [(r["instance"], r["label"]) for r in rows]
    assert len(keys) == 4 and len(set(keys)) == 4
    assert rows[: len(first)] == first  # finished rows are kept as they were
    lines = (out / harness.RUNS).read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)  # the partial line was cut
    # a third run finds nothing to do
    assert harness.bench(files, "osscar,magnitude", out, time_limit=20, progress=False).ran == []


@pytest.fixture(scope="module")
def hard_file(tmp_path_factory):
    rng = np.random.default_rng(3)
    d = 2048  # OSSCAR's greedy phase takes seconds here and checks no deadline
    B = rng.standard_normal((d, 48))
    hard = oo.Instance(B @ B.T / 48 + np.eye(d), rng.standard_normal((d, 16)), d // 2, meta={"id": "hard"})
    return oo.save_instance(hard, tmp_path_factory.mktemp("hard") / "hard.npz")


def test_time_and_memory_limits_are_enforced_from_outside(hard_file, tmp_path):
    rng = np.random.default_rng(3)
    limit, grace = 0.05, 0.3
    t0 = time.perf_counter()
    result = harness.bench([str(hard_file)], ["osscar"], tmp_path / "tl", time_limit=limit, grace=grace,
                           threads=1, progress=False)
    (row,) = result.ran
    assert row["status"] == "TIME_LIMIT" and "killed by the harness" in row["message"]
    assert row["seconds"] <= limit + grace + 0.25 and row["support"] is None
    assert time.perf_counter() - t0 < 30

    small = oo.save_instance(make_instance(rng, 6, 3, "tiny"), tmp_path / "tiny.npz")
    result = harness.bench([str(small)], ["magnitude"], tmp_path / "mem", time_limit=20,
                           memory_limit_gb=0.02, progress=False)
    (row,) = result.ran
    assert row["status"] == "ERROR" and "memory-limit" in row["message"]


def test_a_crashing_worker_becomes_an_error_row(hard_file, library, tmp_path):
    """A worker dying of SIGSEGV (as native code does) is recorded; the bench goes on."""
    small = str(library["files"]["rand-small-k4"])
    out, result = tmp_path / "crash", {}
    thread = threading.Thread(target=lambda: result.update(r=harness.bench(
        [str(hard_file), small], "osscar", out, time_limit=30, threads=1, progress=False)))
    thread.start()
    me, workers = psutil.Process(), []
    deadline = time.time() + 60
    while not workers and time.time() < deadline:
        # harness workers only (multiprocessing's helpers, e.g. its resource tracker, also run `python -c`)
        workers = [c for c in me.children() if "-c" in c.cmdline() and "worker_main" in " ".join(c.cmdline())]
        time.sleep(0.02)
    time.sleep(0.5)
    workers[0].send_signal(signal.SIGSEGV)
    thread.join(timeout=120)
    rows = {r["instance"]: r for r in harness.read_rows(out)}
    assert rows["hard"]["status"] == "ERROR" and "SIGSEGV" in rows["hard"]["message"]
    assert rows["rand-small-k4"]["status"] == "FEASIBLE" and len(result["r"].ran) == 2


def test_bench_on_a_dask_local_cluster(library, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    file = str(library["files"]["rand-small-k4"])
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        result = harness.bench([file], "osscar,enumerate", tmp_path / "dask", time_limit=20,
                               scheduler=cluster.scheduler_address, progress=False)
    rows = harness.read_rows(tmp_path / "dask")
    assert sorted(r["label"] for r in rows) == ["enumerate", "osscar"] and len(result.ran) == 2
    for r in rows:
        assert r["status"] in ("FEASIBLE", "OPTIMAL")
        assert r["err"] == pytest.approx(oo.evaluate(library["small"], r["support"]).err, rel=1e-12)
        assert r["err"] >= library["optimum_small"] - 1e-15


def test_bench_errors_are_one_line(library, bench_run, tmp_path, capsys):
    file = str(library["files"]["rand-small-k4"])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cat = ["--catalog", str(library["catalog"])]
    cases = [
        (["--instances", file, "--solvers", "nope", "--out", str(tmp_path / "o1")], "unknown solver 'nope'"),
        (["--instances", "nothing-*", *cat, "--solvers", "osscar", "--out", str(tmp_path / "o2")],
         "no catalog instance matches"),
        (["--instances", str(tmp_path / "missing-*.npz"), "--solvers", "osscar", "--out", str(tmp_path / "o3")],
         "no instance file matches"),
        (["--instances", file, "--solvers", "osscar", "--out", str(blocker / "out")], "cannot write to --out"),
        (["--instances", file, "--solvers", "osscar", "-p", "enumerate.batch=2", "--out", str(tmp_path / "o4")],
         "not in --solvers"),
        (["--instances", file, "--solvers", "osscar", "--time-limit", "0", "--out", str(tmp_path / "o5")],
         "--time-limit must be a positive"),
        (["--instances", file, "--solvers", "osscar", "--update-catalog", "--out", str(tmp_path / "o6")],
         "--update-catalog needs instances selected from the catalog"),
        (["--instances", file, "--solvers", "osscar", "--time-limit", "5", "--out", str(bench_run)],
         "holds runs with time-limit=20.0"),
    ]
    for args, message in cases:
        assert main(["bench", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("osscar-opt: error: ") and message in err[0], err
    assert main(["report", str(tmp_path)]) == 2
    assert "run `osscar-opt bench" in capsys.readouterr().err
