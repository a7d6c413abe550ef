"""The quality bar against the published OSSCAR code (DESIGN.md section 5).

SmolLM2-135M layers 0/10/20 from the instance library: down_proj neurons at
keep 768 of 1536 and o_proj with 9 heads of 64 rows at keep 4. The published
code reaches err 0.022628 / 0.077604 / 0.077943 on the neurons and the
optimum 0.010491 / 0.225720 / 0.140004 on the heads.
"""

from __future__ import annotations

import json

from .. import library
from ..registry import solve
from . import RESULTS, machine, machine_line

PUBLISHED = {
    "smollm2-l0-neurons-k768": 0.022628,
    "smollm2-l10-neurons-k768": 0.077604,
    "smollm2-l20-neurons-k768": 0.077943,
    "smollm2-l0-heads-k4": 0.010491,
    "smollm2-l10-heads-k4": 0.225720,
    "smollm2-l20-heads-k4": 0.140004,
}


def run(device: str | None = None, repeats: int = 3, out: str | None = None) -> list[dict]:
    from ..io import writable_folder

    writable_folder(RESULTS if out is None else out)  # before the work, not after it
    catalog = library.Catalog.load()
    entries = [catalog.entry(i) for i in PUBLISHED]
    missing = [e for e in entries if not catalog.file_of(e).exists()]
    if missing:
        library.build([e["recipe"] for e in missing])
    rows = []
    for entry in entries:
        inst = catalog.instance(entry)
        solve(inst, "osscar", device=device)  # warm-up
        greedy = min((solve(inst, "osscar", device=device, local_search=False) for _ in range(repeats)),
                     key=lambda s: s.seconds)
        full = min((solve(inst, "osscar", device=device) for _ in range(repeats)), key=lambda s: s.seconds)
        ref = PUBLISHED[entry["id"]]
        rows.append({
            "instance": entry["id"], "published_err": ref,
            "greedy_err": greedy.err, "greedy_seconds": greedy.seconds,
            "osscar_err": full.err, "osscar_seconds": full.seconds, "device": full.device,
            "no_worse": bool(round(full.err, 6) <= ref),
        })
        print(f"{entry['id']:<26} published {ref:.6f}  greedy {greedy.err:.6f} ({greedy.seconds:.3f} s)  "
              f"osscar {full.err:.6f} ({full.seconds:.3f} s)  {'ok' if rows[-1]['no_worse'] else 'WORSE'}")
    info = machine()
    lines = [
        "# OSSCAR against the published code on SmolLM2-135M layers",
        "",
        f"Machine: {machine_line(info)}. Command: `osscar-opt bench-reference`.",
        "Times are the best of %d timed solves after a warm-up (prepare excluded)." % repeats,
        "",
        "| instance | published err | greedy err | greedy s | osscar err | osscar s | no worse |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['instance']} | {r['published_err']:.6f} | {r['greedy_err']:.6f} | {r['greedy_seconds']:.3f} "
                     f"| {r['osscar_err']:.6f} | {r['osscar_seconds']:.3f} | {'yes' if r['no_worse'] else 'NO'} |")
    target = RESULTS if out is None else out
    from pathlib import Path

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    (target / "reference.md").write_text("\n".join(lines) + "\n")
    (target / "reference.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    return rows
