"""MPS export: read back by HiGHS and SCIP, exact objective for a fixed support, MIQP optimum."""

import itertools

import numpy as np
import pytest

import osscar_opt as oo
from osscar_opt import InstanceError
from osscar_opt.mps import bigm_bounds, write_mps

from conftest import brute_force, random_instance

highspy = pytest.importorskip("highspy")
pyscipopt = pytest.importorskip("pyscipopt")


def highs_fixed_qp(path, support):
    """Read the file with HiGHS, fix z to the support, relax integrality, solve the QP."""
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    assert h.readModel(str(path)) == highspy.HighsStatus.kOk
    names = [h.getColName(i)[1] for i in range(h.getNumCol())]
    idx = np.array([i for i, n in enumerate(names) if n.startswith("z")], dtype=np.int32)
    vals = np.array([1.0 if int(names[i][1:]) in support else 0.0 for i in idx])
    h.changeColsBounds(idx.size, idx, vals, vals)
    h.changeColsIntegrality(idx.size, idx, np.array([highspy.HighsVarType.kContinuous] * idx.size))
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    return h.getInfo().objective_function_value


def scip_model(path):
    m = pyscipopt.Model()
    m.hideOutput()
    m.readProblem(str(path))
    m.setParam("numerics/feastol", 1e-9)
    m.setParam("limits/time", 60)
    return m


def scip_solve(path, support=None):
    """SCIP's optimum (objective, chosen support); z fixed to `support` when given."""
    m = scip_model(path)
    zs = [v for v in m.getVars() if v.name.startswith("z")]
    if support is not None:
        for v in zs:
            val = 1.0 if int(v.name[1:]) in support else 0.0
            m.chgVarLb(v, val)
            m.chgVarUb(v, val)
    m.optimize()
    assert m.getStatus() == "optimal"
    chosen = sorted(int(v.name[1:]) for v in zs if m.getVal(v) > 0.5)
    return m.getObjVal(), chosen


def _uneven(rng):
    H = random_instance(rng, p=7, keep=2).H
    return oo.Instance(H, rng.standard_normal((7, 2)), 2, groups=[0, 1, 1, 2, 0, 3, 3])


@pytest.fixture
def neurons(rng):
    return random_instance(rng, p=6, group_size=1, keep=3, m=2)


@pytest.fixture
def gqa(rng):
    return random_instance(rng, p=6, group_size=2, keep=2, m=2, partition=np.repeat(np.arange(2), 3))


def test_bigm_file_is_read_by_highs_and_scip(tmp_path, gqa):
    model = write_mps(gqa, tmp_path / "m.mps", "bigm")
    d, p, r = gqa.d, gqa.p, gqa.m
    assert (model.variables, model.rows, model.columns) == (p + d * r, 1 + 2 + 2 * d * r, r)
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    assert h.readModel(str(model.path)) == highspy.HighsStatus.kOk
    assert (h.getNumCol(), h.getNumRow()) == (model.variables, model.rows)
    lp = h.getLp()
    names = [h.getColName(i)[1] for i in range(h.getNumCol())]
    integer = {n for n, t in zip(names, lp.integrality_) if t == highspy.HighsVarType.kInteger}
    assert integer == {f"z{g}" for g in range(p)}
    assert h.getModel().hessian_.dim_ == model.variables  # the QUADOBJ section was read
    m = scip_model(model.path)
    scip_names = {v.name for v in m.getVars()}
    expected = {f"z{g}" for g in range(p)} | {f"w{i}_{j}" for i in range(d) for j in range(r)}
    assert expected <= scip_names  # SCIP adds one variable for the quadratic objective
    assert sum(v.vtype() == "BINARY" for v in m.getVars()) == p


def test_perspective_file_is_read_by_scip(tmp_path, gqa):
    model = write_mps(gqa, tmp_path / "m.mps", "perspective")
    d, p, r = gqa.d, gqa.p, gqa.m
    assert (model.variables, model.rows) == (2 * p + d * r, 1 + 2 + 2 * d * r + p)  # + t_g, + one cone per group
    m = scip_model(model.path)
    names = {c.name for c in m.getConss()}
    assert {f"qc{g}" for g in range(gqa.p)} <= names and {"card", "part0", "part1"} <= names


@pytest.mark.parametrize("objective", ["f", "err"])
def test_fixed_support_qp_gives_the_evaluators_objective(tmp_path, rng, objective):
    for inst in (random_instance(rng, p=5, group_size=2, keep=2, m=3), _uneven(rng)):
        bigm = write_mps(inst, tmp_path / "b.mps", "bigm", objective=objective).path
        persp = write_mps(inst, tmp_path / "p.mps", "perspective", objective=objective).path
        for S in ([0, 1], [1, 3], [2, 3]):
            ev = oo.evaluate(inst, S)
            target = ev.objective if objective == "f" else ev.err
            assert highs_fixed_qp(bigm, S) == pytest.approx(target, rel=1e-8)
            assert scip_solve(bigm, S)[0] == pytest.approx(target, rel=1e-6)
            assert scip_solve(persp, S)[0] == pytest.approx(target, rel=1e-6)


def test_more_outputs_than_rows_are_reduced_exactly(tmp_path, rng):
    inst = random_instance(rng, p=3, group_size=2, keep=1, m=9)
    model = write_mps(inst, tmp_path / "wide.mps")
    assert model.columns == inst.d == 6 and model.variables == inst.p + inst.d * inst.d
    for S in ([0], [1], [2]):
        assert highs_fixed_qp(model.path, S) == pytest.approx(oo.evaluate(inst, S).objective, rel=1e-8)


@pytest.mark.parametrize("formulation", ["bigm", "perspective"])
def test_scip_solves_the_miqp_to_the_brute_force_optimum(tmp_path, neurons, gqa, formulation):
    for inst in (neurons, gqa):
        optimum, _ = brute_force(inst)
        path = write_mps(inst, tmp_path / "m.mps", formulation).path
        value, chosen = scip_solve(path)
        assert value == pytest.approx(optimum, rel=1e-6)
        assert oo.evaluate(inst, chosen).objective == pytest.approx(optimum, rel=1e-12)


def test_bigm_bounds_hold_for_the_weights_of_every_support(rng):
    inst = random_instance(rng, p=7, group_size=1, keep=3, m=3)
    lower, upper, U = bigm_bounds(inst)
    assert U == 0.0 and np.all(lower <= 0) and np.all(upper >= 0)
    for keep in range(1, inst.p + 1):
        for S in itertools.combinations(range(inst.p), keep):
            W = oo.evaluate(inst, S).weights
            assert np.all(W >= lower - 1e-12) and np.all(W <= upper + 1e-12), S
    # an incumbent tightens the bounds, still valid for every support at least as good
    incumbent = oo.solve(inst, "obs-greedy", device="cpu").objective
    lo2, up2, _ = bigm_bounds(inst, incumbent)
    assert np.all(lo2 >= lower) and np.all(up2 <= upper) and np.any(up2 - lo2 < upper - lower)
    for S in itertools.combinations(range(inst.p), inst.keep):
        ev = oo.evaluate(inst, S)
        if ev.objective <= incumbent:
            assert np.all(ev.weights >= lo2 - 1e-12) and np.all(ev.weights <= up2 + 1e-12)


def test_a_failed_write_leaves_no_partial_file(tmp_path, neurons):
    target = tmp_path / "out.mps"
    target.write_text("previous contents")
    with pytest.raises(InstanceError, match="not positive semidefinite"):
        write_mps(neurons, target, "perspective", diagonal=10 * np.diag(neurons.H))
    assert target.read_text() == "previous contents"
    blocked = tmp_path / "dir.mps"
    blocked.mkdir()  # os.replace onto a directory fails after the temporary file is written
    with pytest.raises(OSError):
        write_mps(neurons, blocked)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.mps", "out.mps"]
    write_mps(neurons, target)
    assert target.read_text().startswith("* osscar-opt") and sorted(p.name for p in tmp_path.iterdir()) == [
        "dir.mps", "out.mps"]


def test_bad_arguments_are_one_line_errors(tmp_path, neurons):
    out = tmp_path / "x.mps"
    with pytest.raises(InstanceError, match="unknown formulation 'sos'"):
        write_mps(neurons, out, "sos")
    with pytest.raises(InstanceError, match="unknown objective"):
        write_mps(neurons, out, objective="gap")
    with pytest.raises(InstanceError, match=r"coefficient lines .* crop the instance"):
        write_mps(neurons, out, max_entries=10)
    with pytest.raises(InstanceError, match="diagonal must be > 0"):
        write_mps(neurons, out, "perspective", diagonal=0.0)
    with pytest.raises(InstanceError, match="incumbent .* below f\\(all\\)"):
        write_mps(neurons, out, incumbent=2 * neurons.full_objective)
    with pytest.raises(InstanceError, match="use it with formulation='perspective'"):
        write_mps(neurons, out, "bigm", diagonal=0.1)
    assert not out.exists()
