#!/usr/bin/env python3
"""Compare compile reports made under different triton versions (benchmarks/compile_report.py JSON).

    python benchmarks/compile_report_versions.py A.json B.json [...] [--md OUT.md]

Prints (and writes with ``--md``) per report: triton version, commit, date, rows passing the
gate per target; then the Gluon kernel's rows side by side (registers, spills, shared bytes,
IGMMA count, wait pendings in TTGIR and SASS, ptxas serialization); then how far the register
counts differ, and every row whose compile status, spills, shared memory, int8 MMA count or waits
differ between the reports.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gate():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from compile_check import row_problems

    return row_problems


def load(path):
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, list):  # reports written before the {meta, rows} format
        data = {"meta": {"triton": "?", "commit": "?", "date": "?"}, "rows": data}
    return data


def _fmt(v):
    if isinstance(v, list):
        return ",".join(map(str, v)) or "-"
    if isinstance(v, dict):
        return ", ".join(f"{k} x{n}" for k, n in v.items()) or "-"
    return "" if v is None else str(v)


def report(paths) -> str:
    row_problems = _gate()
    reps = [load(p) for p in paths]
    out = ["| triton | commit | date (UTC) | target | rows | pass the gate |", "|---|---|---|---|---|---|"]
    for r in reps:
        m = r["meta"]
        for t in sorted({row["target"] for row in r["rows"]}):
            rows = [row for row in r["rows"] if row["target"] == t]
            ok = sum(not row_problems(row) for row in rows)
            out.append(f"| {m['triton']} | {m['commit'][:12]}{'+dirty' if m['commit'].endswith('+dirty') else ''} "
                       f"| {m['date']} | {t} | {len(rows)} | {ok} |")
    cols = ["ok", "n_regs", "spill_bytes", "shared_bytes", "smem_buffers", "int8_mma_ops", "wgmma_wait_pendings",
            "sass_wgmma_waits", "wgmma_serialized", "sass_instructions"]
    out += ["", "Gluon kernel (sm_90):", "", "| triton | kernel | config | " + " | ".join(cols) + " |",
            "|" + "---|" * (3 + len(cols))]
    for r in reps:
        for row in r["rows"]:
            if row.get("family") == "gluon" or row["kernel"].endswith("_gluon_wgmma_async"):
                out.append(f"| {r['meta']['triton']} | {row['kernel']} | {row['config']} | "
                           + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    keys = ["ok", "spill_bytes", "shared_bytes", "int8_mma", "wgmma_wait_pendings", "sass_wgmma_waits"]
    by = [{(row["kernel"], row["config"], row["target"]): row for row in r["rows"]} for r in reps]
    diff = []
    for key in sorted(set().union(*by)):
        vals = [b.get(key) for b in by]
        if any(v is None for v in vals) or any(any(v.get(k) != vals[0].get(k) for k in keys) for v in vals[1:]):
            cells = [" / ".join(_fmt(v.get(k)) if v else "absent" for v in vals) for k in ("ok", "n_regs",
                                                                                          "spill_bytes", "shared_bytes",
                                                                                          "int8_mma")]
            diff.append(f"| {' | '.join(key)} | " + " | ".join(cells) + " |")
    versions = " / ".join(r["meta"]["triton"] for r in reps)
    regs = [[b[key].get("n_regs") for b in by] for key in set.intersection(*map(set, by))]
    regs = [v for v in regs if None not in v and len(set(v)) > 1]
    spread = max((max(v) - min(v) for v in regs), default=0)
    out += ["", f"Registers differ on {len(regs)} of {len(set.intersection(*map(set, by)))} common rows, by at most "
            f"{spread}.", "", f"Rows that differ in compiled / spills / shared / int8 MMA count / wgmma waits "
            f"({versions}):", "",
            "| kernel | config | target | ok | n_regs | spill_bytes | shared_bytes | int8_mma |",
            "|---|---|---|---|---|---|---|---|"] + (diff or ["| (none) |||||||"])
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--md", help="write the comparison here")
    a = ap.parse_args(argv)
    text = report(a.reports)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
