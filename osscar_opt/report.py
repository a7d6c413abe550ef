"""Tables and plots for a bench results folder (`osscar-opt report OUT`).

Reads OUT/runs.jsonl (written by `osscar-opt bench`) and writes into OUT:

    report.md                 per-tier tables, the median certified gap per solver at a few
                              times (from the traces), skip reasons, errors, per-instance results
    performance_profile.png   Dolan-More profiles: time to proven optimality, and
                              time to reach the best known err
    gap_vs_time.png           certified gap against time (traces where solvers record
                              info["trace"]; otherwise the final gap of every run)
    err_vs_best.png           err in excess of the best known, by solver (box + points)

"Best known" for an instance is the smallest err among the runs that returned
a support and the catalog's best at run time (the rows carry it); every err in
the rows comes from the fp64 evaluator. The excess is (err - best) / best.
matplotlib draws through its Agg canvas directly, so no global backend is set.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from .harness import RUNS, SETTINGS, BenchError, read_rows

SOLVED = ("OPTIMAL", "FEASIBLE", "TIME_LIMIT")
TIME_FLOOR_S = 1e-3  # times below this are timer noise; ratios use max(t, floor)
REACHED_TOL = 1e-6  # relative excess counted as "reached the best known"
PLOTS = ("performance_profile.png", "gap_vs_time.png", "err_vs_best.png")


# --------------------------------------------------------------- numbers
def has_support(row: dict) -> bool:
    return row.get("status") in SOLVED and row.get("err") is not None and row.get("support") is not None


def best_known(rows: Iterable[dict]) -> dict[str, dict]:
    """Per instance: the smallest confirmed err and the largest proven lower bound on err."""
    best: dict[str, dict] = {}
    for r in rows:
        b = best.setdefault(r["instance"], {"err": math.inf, "bound_err": -math.inf, "optimal": False})
        known = r.get("best_known") or {}
        if known.get("err") is not None:
            b["err"] = min(b["err"], float(known["err"]))
            b["optimal"] |= known.get("status") == "optimal"
        if known.get("bound_err") is not None:
            b["bound_err"] = max(b["bound_err"], float(known["bound_err"]))
        if has_support(r):
            b["err"] = min(b["err"], float(r["err"]))
        if r.get("status") in SOLVED and r.get("err_bound") is not None:
            b["bound_err"] = max(b["bound_err"], float(r["err_bound"]))
        if r.get("status") == "OPTIMAL":
            b["optimal"] = True
    return best


def excess(err: float, best: float) -> float:
    """Relative excess of err over the best known (0 = matches it)."""
    if not math.isfinite(best):
        return math.nan
    diff = max(0.0, err - best)
    return diff / best if best > 1e-15 else diff


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def _fmt(value: float | None, spec: str = ".3g", scale: float = 1.0, none: str = "-", zero: float = 0.0) -> str:
    """`value * scale` formatted; "-" when missing; "0" when |value| <= zero (round-off)."""
    if value is None or not math.isfinite(value):
        return none
    if abs(value) <= zero:
        return "0"
    return format(value * scale, spec)


def summary_rows(rows: list[dict], best: dict[str, dict]) -> list[dict]:
    """One summary per solver label over `rows`."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    out = []
    for label, rs in by_label.items():
        ran = [r for r in rs if r["status"] != "SKIPPED"]
        count = {s: sum(r["status"] == s for r in rs) for s in ("OPTIMAL", "FEASIBLE", "TIME_LIMIT", "ERROR", "SKIPPED")}
        out.append({
            "label": label,
            "runs": len(ran),
            **count,
            "median_seconds": _median([r.get("seconds") for r in ran]),
            "median_excess": _median([excess(r["err"], best[r["instance"]]["err"]) for r in ran if has_support(r)]),
            "median_gap": _median([r.get("gap") for r in ran if r.get("status") in SOLVED]),
            "with_bound": sum(r.get("gap") is not None for r in ran if r.get("status") in SOLVED),
        })
    return out


def _labels(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["label"] for r in rows))


def _tier_key(tier: str) -> tuple:
    return (0, int(tier[1:])) if tier[:1] == "T" and tier[1:].isdigit() else (1, tier)


# --------------------------------------------------------------- markdown
def _table(head: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def _summary_table(rows: list[dict], best: dict[str, dict]) -> list[str]:
    body = []
    for s in summary_rows(rows, best):
        body.append([
            f"`{s['label']}`", str(s["runs"]), str(s["OPTIMAL"]), str(s["FEASIBLE"]), str(s["TIME_LIMIT"]),
            str(s["ERROR"]), str(s["SKIPPED"]), _fmt(s["median_seconds"]),
            _fmt(s["median_excess"], ".3g", 100.0, zero=1e-12), _fmt(s["median_gap"], ".3g", 100.0, zero=1e-9) + (
                f" ({s['with_bound']})" if s["with_bound"] else ""),
        ])
    return _table(["solver", "runs", "optimal", "feasible", "time limit", "error", "skipped", "median s",
                   "median err excess %", "median certified gap % (runs)"], body)


def markdown(rows: list[dict], settings: dict, best: dict[str, dict]) -> str:
    lines = ["# Bench report", ""]
    instances = list(dict.fromkeys(r["instance"] for r in rows))
    machines = sorted({(r.get("machine") or {}).get("cpu", "?") + (
        f", GPU {(r.get('machine') or {})['gpu']}" if (r.get("machine") or {}).get("gpu") else "") for r in rows})
    first = next((r for r in rows if r.get("versions")), {})
    versions = ", ".join(f"{k} {v}" for k, v in (first.get("versions") or {}).items())
    lines += [
        f"{len(rows)} runs: {len(instances)} instances x {len(_labels(rows))} solvers; "
        f"time limit {settings.get('time_limit', '?')} s per run (killed at + {settings.get('grace', '?')} s), "
        f"device {settings.get('device', '?')}.",
        f"Machine: {'; '.join(machines)}. osscar-opt {first.get('osscar_opt', '?')}; {versions}.",
        "",
        "err is the relative reconstruction error from the fp64 evaluator; *err excess* is (err - best known) / "
        "best known, best known being the smallest err of any run here or in the catalog; the certified gap is "
        "(err - proven lower bound) / err, over the runs that proved a bound. Times are the timed solve only. "
        "Regenerate with `osscar-opt report <this folder>`.",
        "",
    ]
    tiers = sorted({r["tier"] for r in rows}, key=_tier_key)
    if len(tiers) > 1:
        lines += ["## All tiers", ""] + _summary_table(rows, best) + [""]
    for tier in tiers:
        mine = [r for r in rows if r["tier"] == tier]
        n = len({r["instance"] for r in mine})
        lines += [f"## Tier {tier} ({n} instance{'s' if n != 1 else ''})", ""] + _summary_table(mine, best) + [""]
    lines += _gap_over_time(rows, settings)
    lines += [
        "## Plots", "",
        "Performance profiles (Dolan-More): for each solver the fraction of instances it solves within a factor "
        "tau of the fastest solver on that instance; left, time to proven optimality; right, time to reach the "
        f"best known err (within {REACHED_TOL:g} relative). Times below {TIME_FLOOR_S:g} s count as {TIME_FLOOR_S:g} s.",
        "", "![performance profiles](performance_profile.png)", "",
        "Certified gap against time.", "", "![gap versus time](gap_vs_time.png)", "",
        "err in excess of the best known, by solver.", "", "![err versus best known](err_vs_best.png)", "",
    ]
    skipped = defaultdict(int)
    for r in rows:
        if r["status"] == "SKIPPED":
            skipped[(r["label"], r.get("reason") or r.get("message") or "")] += 1
    if skipped:
        lines += ["## Skipped", ""] + _table(
            ["solver", "reason", "runs"], [[f"`{k[0]}`", k[1].replace("|", "/"), str(v)] for k, v in skipped.items()]
        ) + [""]
    errors = [r for r in rows if r["status"] == "ERROR" or (r["status"] == "TIME_LIMIT" and r.get("support") is None)]
    if errors:
        lines += ["## Errors and runs without a solution", ""] + _table(
            ["instance", "solver", "status", "message"],
            [[r["instance"], f"`{r['label']}`", r["status"], (r.get("message") or "")[:240].replace("|", "/")]
             for r in errors]) + [""]
    labels = _labels(rows)
    by_pair = {(r["instance"], r["label"]): r for r in rows}
    body = []
    meta = {r["instance"]: r for r in rows}
    for iid in sorted(instances, key=lambda i: (_tier_key(meta[i]["tier"]), meta[i]["p"], i)):
        b = best[iid]
        cells = [iid, meta[iid]["tier"], str(meta[iid]["p"]), str(meta[iid]["keep"]),
                 _fmt(b["err"], ".6f") + (" *" if b["optimal"] else ""), _fmt(b["bound_err"], ".6f")]
        for label in labels:
            r = by_pair.get((iid, label))
            if r is None:
                cells.append("")
            elif has_support(r):
                mark = {"OPTIMAL": " opt", "TIME_LIMIT": " tl"}.get(r["status"], "")
                cells.append(f"{r['err']:.6f}{mark} ({_fmt(r.get('seconds'))} s)")
            else:
                cells.append(r["status"].lower())
        body.append(cells)
    lines += ["## Every run", "",
              "err per instance and solver (opt = proven optimal, tl = stopped by the time limit), "
              "time in parentheses; best err marked * when proven optimal; lb = best proven lower bound on err.", ""]
    lines += _table(["instance", "tier", "p", "keep", "best err", "lb"] + [f"`{l}`" for l in labels], body) + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------ plots
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _colors(labels: list[str]) -> dict[str, str]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def profile_ratios(rows: list[dict], success) -> dict[str, list[float]]:
    """Dolan-More ratios t(i, s) / min_s t(i, s) per solver label (inf where it failed),
    over every instance that some solver ran."""
    instances = list(dict.fromkeys(r["instance"] for r in rows))
    labels = _labels(rows)
    times: dict[tuple[str, str], float] = {}
    for r in rows:
        if r["status"] != "SKIPPED" and success(r) and r.get("seconds") is not None:
            times[(r["instance"], r["label"])] = max(float(r["seconds"]), TIME_FLOOR_S)
    out: dict[str, list[float]] = {label: [] for label in labels}
    for iid in instances:
        fastest = min((t for (i, _), t in times.items() if i == iid), default=None)
        for label in labels:
            t = times.get((iid, label))
            out[label].append(math.inf if t is None or fastest is None else t / fastest)
    return out


def _draw_profile(ax, ratios: dict[str, list[float]], colors: dict, title: str) -> None:
    finite = [v for vs in ratios.values() for v in vs if math.isfinite(v)]
    tau_max = max(2.0, max(finite, default=1.0) * 1.5)
    drawn = 0
    for label, rs in ratios.items():
        if not rs or not any(math.isfinite(v) for v in rs):
            continue
        xs = sorted(v for v in rs if math.isfinite(v))
        ys = [(i + 1) / len(rs) for i in range(len(xs))]
        ax.step([1.0] + xs + [tau_max], [0.0] + ys + [ys[-1]], where="post", label=label, color=colors[label])
        drawn += 1
    ax.set_xscale("log", base=2)
    ax.set_xlim(1.0, tau_max)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("tau (time / fastest solver's time)")
    ax.set_ylabel("fraction of instances")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no run succeeded", transform=ax.transAxes, ha="center", va="center", color="gray")


def plot_performance_profile(rows: list[dict], best: dict[str, dict], path: Path) -> Path:
    colors = _colors(_labels(rows))
    fig = _figure(11, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    _draw_profile(ax1, profile_ratios(rows, lambda r: r["status"] == "OPTIMAL"), colors,
                  "time to proven optimality")
    _draw_profile(ax2, profile_ratios(
        rows, lambda r: has_support(r) and excess(r["err"], best[r["instance"]]["err"]) <= REACHED_TOL),
        colors, f"time to the best known err (rel. {REACHED_TOL:g})")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _trace_points(trace) -> list[tuple[float, float]]:
    pts = []
    for item in trace or []:
        try:
            t, ub, lb = (float(x) if x is not None else math.nan for x in list(item)[:3])
        except (TypeError, ValueError):
            continue
        if math.isfinite(t) and math.isfinite(ub) and math.isfinite(lb) and ub > 0:
            pts.append((max(t, TIME_FLOOR_S), max(0.0, (ub - lb) / ub)))
    return pts


def gap_at(points: list[tuple[float, float]], t: float) -> float:
    """The certified gap a trace had reached at time t (1 = no bound yet)."""
    gap = 1.0
    for tt, g in points:
        if tt > t:
            break
        gap = g
    return gap


def _gap_over_time(rows: list[dict], settings: dict) -> list[str]:
    """Median certified gap per solver at a few times, from the recorded traces."""
    limit = settings.get("time_limit")
    marks = [m for m in (0.1, 1.0, 10.0, 60.0, 600.0) if limit is None or m < float(limit)]
    if limit is not None:
        marks.append(float(limit))
    body = []
    for tier in sorted({r["tier"] for r in rows}, key=_tier_key):
        for label in _labels(rows):
            traces = [_trace_points((r.get("info") or {}).get("trace")) for r in rows
                      if r["label"] == label and r["tier"] == tier and r.get("status") in SOLVED]
            traces = [t for t in traces if t]
            if traces:
                body.append([tier, f"`{label}`", str(len(traces))] +
                            [_fmt(statistics.median(gap_at(t, m) for t in traces), ".3g", 100.0, zero=1e-9)
                             for m in marks])
    if not body:
        return []
    return ["## Certified gap over time", "",
            "Median over the instances of a tier of the certified gap (%) each solver had reached at each time, "
            "from the progress traces its runs recorded (info[\"trace\"]); before a run's first bound its gap "
            "counts as 100%.", ""] + _table(["tier", "solver", "runs traced"] + [f"{m:g} s" for m in marks], body) + [""]


def plot_gap_vs_time(rows: list[dict], path: Path) -> Path:
    labels = _labels(rows)
    colors = _colors(labels)
    fig = _figure(7, 4.2)
    ax = fig.subplots()
    drawn = set()
    traced: list[float] = []
    for r in rows:
        pts = _trace_points((r.get("info") or {}).get("trace"))
        traced += [100 * g for _, g in pts]
        if len(pts) >= 2:
            xs, ys = zip(*pts)
            ax.step(xs, [100 * y for y in ys], where="post", color=colors[r["label"]], alpha=0.5, lw=1,
                    label=None if r["label"] in drawn else f"{r['label']} (trace)")
            drawn.add(r["label"])
    for label in labels:
        pts = [(max(float(r["seconds"]), TIME_FLOOR_S), 100 * float(r["gap"])) for r in rows
               if r["label"] == label and r.get("status") in SOLVED and r.get("gap") is not None
               and r.get("seconds") is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=18, color=colors[label], label=f"{label} (final)", zorder=3)
            drawn.add(label)
    gaps = [100 * float(r["gap"]) for r in rows if r.get("gap") is not None] + traced
    top = max([1.0] + [1.05 * min(g, 100.0) for g in gaps])
    ax.set_ylim(-0.02 * top, top)
    ax.set_xscale("log")
    ax.set_xlabel("seconds")
    ax.set_ylabel("certified gap (%)")
    ax.set_title("certified gap versus time", fontsize=10)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no run recorded a lower bound", transform=ax.transAxes, ha="center", va="center",
                color="gray")
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_err_vs_best(rows: list[dict], best: dict[str, dict], path: Path) -> Path:
    labels = [label for label in _labels(rows) if any(has_support(r) for r in rows if r["label"] == label)]
    colors = _colors(_labels(rows))
    fig = _figure(max(6.0, 1.1 * len(labels) + 2), 4.2)
    ax = fig.subplots()
    data = [[100 * excess(r["err"], best[r["instance"]]["err"]) for r in rows
             if r["label"] == label and has_support(r)] for label in labels]
    if labels:
        ax.boxplot(data, positions=range(1, len(labels) + 1), widths=0.5, showfliers=False)
        for i, (label, values) in enumerate(zip(labels, data), start=1):
            jitter = [i + 0.15 * math.sin(7.3 * k) for k in range(len(values))]
            ax.scatter(jitter, values, s=12, color=colors[label], alpha=0.8, zorder=3)
        ax.set_xticks(range(1, len(labels) + 1))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(bottom=0.0)
    else:
        ax.text(0.5, 0.5, "no run returned a support", transform=ax.transAxes, ha="center", va="center", color="gray")
    ax.set_ylabel("err excess over the best known (%)")
    ax.set_title("err relative to the best known", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


# ------------------------------------------------------------------ entry
def load(out: str | Path) -> tuple[list[dict], dict]:
    out = Path(out)
    if not (out / RUNS).exists():
        raise BenchError(f"no {RUNS} in {out}: run `osscar-opt bench --out {out} ...` first")
    rows = read_rows(out / RUNS)
    if not rows:
        raise BenchError(f"{out / RUNS} holds no complete run yet: let `osscar-opt bench --out {out}` finish one")
    settings = {}
    if (out / SETTINGS).exists():
        try:
            settings = json.loads((out / SETTINGS).read_text())
        except ValueError:
            settings = {}
    return rows, settings


def write_report(out: str | Path) -> Path:
    """Write report.md and the PNG plots into `out`; returns the report path."""
    out = Path(out)
    rows, settings = load(out)
    best = best_known(rows)
    try:
        plot_performance_profile(rows, best, out / PLOTS[0])
        plot_gap_vs_time(rows, out / PLOTS[1])
        plot_err_vs_best(rows, best, out / PLOTS[2])
    except ImportError:
        raise BenchError("the report plots need matplotlib: pip install 'osscar-opt[bench]'") from None
    path = out / "report.md"
    path.write_text(markdown(rows, settings, best))
    return path
