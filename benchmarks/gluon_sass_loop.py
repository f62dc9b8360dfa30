#!/usr/bin/env python3
"""A kernel's main loop, as ptxas compiled it (default: the Gluon wgmma kernel for sm_90), installed triton.

    python benchmarks/gluon_sass_loop.py [--variant qgemm_w8a8_fp16_gluon_wgmma_async] [--all]
    python benchmarks/gluon_sass_loop.py --variant qconv2d_w8a8_3x3s1_fp16 --target sm_80 --config 1 --brief

No GPU needed. Prints the SASS instructions of the K loop (the body of its backward branch) that
decide whether the kernel does what it exists for: global loads (LDG), shared stores (STS),
fences and barriers (MEMBAR, FENCE, BAR), the wgmma group (WARPGROUP.ARRIVE, IGMMA ... S8.S8) and
its wait (``WARPGROUP.DEPBAR.LE gsb0, 0x1`` = one wgmma group stays in flight), and a count of the
rest (the quantization arithmetic); ``--all`` prints every instruction of the loop. Then the
TTGIR shared-memory allocations. ``--brief``: one line (loop length, registers, spills), e.g. to compare
a kernel before and after a change (``--variant`` / ``--target`` / ``--config``: any compile_check row). Use it to compare triton versions (it is what the results'
compile-report notes quote).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

KEEP = ("LDG", "STG", "STS", "LDS", "MEMBAR", "FENCE", "BAR", "WARPGROUP", "IGMMA", "HGMMA", "LDL", "STL", "BRA")
_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def loop_body(sass: str):
    """(address, instruction) pairs of the innermost loop closed by a backward branch."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in map(_LINE.match, sass.splitlines()) if m]
    loops = []
    for addr, text in ins:
        b = re.search(r"\bBRA\s+(?:`\()?.*?0x([0-9a-f]+)", text)
        if b and int(b.group(1), 16) < addr:
            loops.append((int(b.group(1), 16), addr))
    if not loops:
        return []
    start, end = min(loops, key=lambda se: se[1] - se[0])
    return [(a, t) for a, t in ins if start <= a <= end]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="qgemm_w8a8_fp16_gluon_wgmma_async")
    ap.add_argument("--all", action="store_true", help="print every instruction of the loop")
    ap.add_argument("--target", default="sm_90", choices=("sm_90", "sm_80"))
    ap.add_argument("--config", type=int, default=0, help="index into compile_check.CONFIGS[(family, target)]")
    ap.add_argument("--brief", action="store_true", help="one line: loop length, registers, spills")
    a = ap.parse_args(argv)
    import triton
    from triton.backends.compiler import GPUTarget
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compile_check as cc
    v = cc.variants()[a.variant]
    bm, bn, bk, warps, stages = cc.CONFIGS[(v.family, a.target)][a.config]
    k = triton.compile(cc.build_source(v, bm, bn, bk), target=GPUTarget("cuda", cc.TARGETS[a.target], 32),
                       options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=cc.FP_FUSION))
    body = loop_body(cc._cuobjdump(["-sass"], k.asm["cubin"]))
    head = f"triton {triton.__version__}, {a.variant} {bm}x{bn}x{bk} w{warps} s{stages}, {a.target}"
    if a.brief:
        ru = cc._cuobjdump(["--dump-resource-usage"], k.asm["cubin"])
        regs, local = (re.search(rf"{key}:(\d+)", ru) for key in ("REG", "LOCAL"))
        print(f"{head}: K loop {len(body)} SASS instructions, {regs and regs.group(1)} registers, "
              f"{local and local.group(1)} bytes local memory", flush=True)
        return 0 if body else 1
    print(f"{head}: K loop = {len(body)} SASS instructions")
    rest = collections.Counter()
    for addr, text in body:
        op = re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split()[0]
        if a.all or op.split(".")[0] in KEEP:
            print(f"  {addr:05x}  {text}")
        else:
            rest[op.split(".")[0]] += 1
    if rest:
        print("  other:", ", ".join(f"{op} x{n}" for op, n in rest.most_common()))
    allocs = re.findall(r"ttg\.local_alloc[^\n]*?-> !ttg\.memdesc<([0-9x]+x[a-z]+[0-9]+)", k.asm["ttgir"])
    print(f"TTGIR shared allocations: {allocs}; shared bytes at launch: {k.metadata.shared}")
    return 0 if body else 1


if __name__ == "__main__":
    sys.exit(main())
