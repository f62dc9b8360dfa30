#!/usr/bin/env python3
"""Compile report: every Triton kernel x autotune config x target (sm_90, sm_80), no GPU needed.

    python benchmarks/compile_report.py --json benchmarks/results/compile_report.json \\
        [--md benchmarks/results/compile_report.md] [--subset] [--targets sm_90,sm_80] [--check]

Rows (JSON list): kernel, config, target ("sm_90"/"sm_80"), ok, n_regs, spill_bytes, shared_bytes,
int8_mma, mma_version, wgmma_wait_pendings, plus details (SASS int8 opcodes, cp.async/TMA counts,
compile time). ``--check`` exits 1 when a row fails the gate: compiled, int8 tensor-core SASS
present, no spills, shared memory within the target's per-block limit. See benchmarks/compile_check.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # explicit: the default changes in triton 3.10


def _import_compile_check():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compile_check

    return compile_check


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="write the rows here (JSON list)")
    ap.add_argument("--md", help="also write a markdown table here")
    ap.add_argument("--targets", default="sm_90,sm_80")
    ap.add_argument("--subset", action="store_true", help="one config per variant and target (rotating)")
    ap.add_argument("--variants", help="comma-separated variant names (default: all)")
    ap.add_argument("--check", action="store_true", help="exit 1 if any row fails the gate")
    a = ap.parse_args(argv)
    cc = _import_compile_check()
    targets = tuple(t.strip() for t in a.targets.split(",") if t.strip())
    bad = [t for t in targets if t not in cc.TARGETS]
    if bad:
        ap.error(f"unknown targets {bad}; choose from {sorted(cc.TARGETS)}")
    names = set(a.variants.split(",")) if a.variants else None
    if names and names - set(cc.variants()):
        ap.error(f"unknown variants {sorted(names - set(cc.variants()))}; known: {sorted(cc.variants())}")
    t0 = time.time()
    rows = cc.run(cc.plan(targets, names, subset=a.subset))
    meta = {"triton": __import__("triton").__version__, "fp_fusion": cc.FP_FUSION,
            "seconds": round(time.time() - t0, 1), "subset": a.subset}
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(rows, f, indent=1, default=str)
    md = cc.to_markdown(rows)
    if a.md:
        with open(a.md, "w") as f:
            f.write(f"# Compile report\n\ntriton {meta['triton']}, FP fusion {meta['fp_fusion']}, "
                    f"{len(rows)} compiles in {meta['seconds']} s\n\n{md}\n")
    print(md)
    probs = cc.problems(rows)
    for p in probs:
        print("CHECK FAILED:", p, file=sys.stderr)
    return 1 if (a.check and probs) else 0


if __name__ == "__main__":
    sys.exit(main())
