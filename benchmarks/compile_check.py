"""Ahead-of-time compilation of every Triton kernel and autotune config, on a machine with no GPU.

For each (kernel variant, autotune config, target) this compiles the kernel with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` using the bundled ptxas, with
the ``tt.divisibility`` hints that Triton's launcher adds at run time for 16-byte-aligned
pointers and integers that are multiples of 16 (without them the code is much worse and not what
runs), then reads:

* ``n_regs`` and spills from the ptxas log (``spill_bytes`` = spill stores + spill loads),
* ``shared_bytes``: the dynamic shared memory Triton requests at launch,
* ``int8_mma``: count of int8 tensor-core SASS instructions (``IGMMA.*.S8.S8`` on sm_90a,
  ``IMMA.16832.S8.S8`` on sm_80) from ``cuobjdump -sass`` of the cubin,
* ``mma_version`` (2 = mma.sync, 3 = wgmma) and ``wgmma_wait_pendings`` (the pendings of the
  ``warp_group_dot_wait`` ops in the TTGIR; a value >= 1 means one wgmma group stays in flight
  while the next is issued, 0 alone means every wgmma is waited for before the next),
* ``sass_wgmma_waits``: the same waits as ptxas emitted them (``WARPGROUP.DEPBAR.LE gsb0, N``), and
  ``wgmma_serialized``: ptxas reported serializing the wgmma instructions (it then inserts waits of
  its own and the overlap is gone whatever the TTGIR says),
* ``smem_buffers``: the shared-memory allocations in the TTGIR (e.g. ``2x128x64xi8`` = two slots).

The Gluon kernel (family ``"gluon"``, sm_90 only) must in addition keep one wgmma in flight: a
pending count of 1 in both the TTGIR and the SASS, and no serialization (``problems``).

FP fusion is set explicitly (``FP_FUSION``): Triton's default changes in 3.10. Our numerics do not
depend on it (the clamp sits between the quantization multiply and the rounding add, so they
cannot be contracted; the epilogue's multiply-add is within the tests' fp32 tolerance either way).

The kernels are re-wrapped from their raw Python functions, so this works even when
``TRITON_INTERPRET=1`` was set when ``kernels`` was imported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import subprocess
import tempfile
import time

# Explicit, before triton reads it: Triton 3.9 defaults to fusion ON and 3.10 to OFF.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from kernels import configs  # noqa: E402  (the source tree's kernels/: run from a checkout)
from kernels._launch import raw_python_fn  # noqa: E402
from kernels.qconv2d import qconv2d_kernel  # noqa: E402
from kernels.qgemm import GROUP_M, qgemm_kernel  # noqa: E402

FP_FUSION = True
TARGETS = {"sm_90": 90, "sm_80": 80}
# max dynamic shared memory per block (opt-in): 227 KB on H100, 163 KB on A100
SHARED_LIMIT = {"sm_90": 232448, "sm_80": 166912}
CONFIGS = {("gemm", "sm_90"): configs.GEMM_SM90, ("gemm", "sm_80"): configs.GEMM_SM80,
           ("conv", "sm_90"): configs.CONV_SM90, ("conv", "sm_80"): configs.CONV_SM80,
           # the experimental Gluon wgmma kernel: Hopper only, one config (kernels/qgemm_gluon.py)
           ("gluon", "sm_90"): ((128, 128, 64, 8, 1), ), ("gluon", "sm_80"): ()}

# The kernels' do_not_specialize integers (M, NUM_GROUPS, M_BUCKET; conv also H, W, HO, WO) never get a
# divisibility hint at run time, so they get none here.
_GEMM_SIG = {
    "x_ptr": "*fp16:16", "w_ptr": "*i8:16", "y_ptr": "*fp16:16", "w_scale_ptr": "*fp32:16",
    "a_scale_ptr": "*fp32:16", "group_ptr": "*i64:16", "bias_ptr": "*fp32:16",
    "M": "i32", "N": "i32:16", "K": "i32:16", "KP": "i32:16", "NUM_GROUPS": "i32", "M_BUCKET": "i32",
    "stride_xm": "i32:16", "stride_wn": "i32:16", "stride_ym": "i32:16",
}
_CONV_SIG = {
    "x_ptr": "*fp16:16", "w_ptr": "*i8:16", "y_ptr": "*fp16:16", "w_scale_ptr": "*fp32:16",
    "a_scale_ptr": "*fp32:16", "group_ptr": "*i64:16", "bias_ptr": "*fp32:16",
    "H": "i32", "W": "i32", "CIN": "i32:16", "HO": "i32", "WO": "i32", "M": "i32",
    "N": "i32:16", "K": "i32:16", "KP": "i32:16", "NUM_GROUPS": "i32", "M_BUCKET": "i32",
    "stride_xb": "i32:16", "stride_xh": "i32:16", "stride_xw": "i32:16", "stride_wn": "i32:16",
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled specialization of a kernel: its runtime signature and fixed constexprs."""
    name: str
    family: str  # "gemm", "conv" or "gluon": which config lists apply
    kernel: object
    signature: dict
    constexprs: dict


def _gemm(bits, dtype="fp16", even_k=True):
    sig = dict(_GEMM_SIG, x_ptr=f"*{dtype}:16", y_ptr=f"*{dtype}:16")
    return Variant(f"qgemm_w{bits}a8_{dtype}" + ("" if even_k else "_maskedK"), "gemm", qgemm_kernel, sig,
                   dict(BITS=bits, HAS_BIAS=True, EVEN_K=even_k, GROUP_M=GROUP_M))


def _conv(bits, k, s, dtype="fp16"):
    sig = dict(_CONV_SIG, x_ptr=f"*{dtype}:16", y_ptr=f"*{dtype}:16")
    p = k // 2
    return Variant(f"qconv2d_w{bits}a8_{k}x{k}s{s}_{dtype}", "conv", qconv2d_kernel, sig,
                   dict(KH=k, KW=k, SH=s, SW=s, PH=p, PW=p, DH=1, DW=1, BITS=bits, HAS_BIAS=True,
                        EVEN_K=True, CIN_ALIGNED=True, GROUP_M=GROUP_M))


def _gluon(dtype="fp16"):
    from kernels.qgemm_gluon import qgemm_w8a8_gluon_kernel
    sig = {k: v for k, v in _GEMM_SIG.items() if k not in ("KP", "M_BUCKET")}
    sig.update(x_ptr=f"*{dtype}:16", y_ptr=f"*{dtype}:16")
    return Variant(f"qgemm_w8a8_{dtype}_gluon_wgmma_async", "gluon", qgemm_w8a8_gluon_kernel, sig,
                   dict(HAS_BIAS=True))


def variants():
    """Every kernel specialization the launchers produce on the hot paths, by name."""
    vs = [_gemm(8), _gemm(4), _gemm(8, "bf16"), _gemm(4, even_k=False),
          _conv(8, 3, 1), _conv(4, 3, 1), _conv(8, 3, 2), _conv(8, 1, 1), _conv(4, 1, 1, "bf16")]
    try:
        vs += [_gluon(), _gluon("bf16")]
    except ImportError:  # triton without Gluon (older than 3.4-ish): the experimental rows are left out
        pass
    return {v.name: v for v in vs}


def build_source(variant: Variant, block_m: int, block_n: int, block_k: int) -> ASTSource:
    """ASTSource with the launcher's specialization: constexprs by index, divisibility hints."""
    if variant.family == "gluon":
        from triton.experimental.gluon._runtime import GluonASTSource as source_cls
        fn = variant.kernel  # Gluon kernels have no interpreter wrapper to undo
    else:
        source_cls, fn = ASTSource, JITFunction(raw_python_fn(variant.kernel))
    consts = dict(variant.constexprs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[(i, )] = consts[name]
            continue
        ty, _, hint = variant.signature[name].partition(":")
        signature[name] = ty
        if hint == "16":
            attrs[(i, )] = [["tt.divisibility", 16]]
    return source_cls(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _cuobjdump(args, cubin: bytes) -> str:
    try:
        exe = knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - fall back to PATH
        exe = "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([exe, *args, path], check=True, capture_output=True, text=True).stdout
    finally:
        os.remove(path)


_SASS_OP = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.x]*)")


def sass_opcodes(sass: str) -> list[str]:
    return [m.group(1) for m in map(_SASS_OP.match, sass.splitlines()) if m]


def int8_mma_ops(ops) -> dict:
    """Count the int8 tensor-core opcodes: IMMA.*.S8 (mma.sync) and IGMMA.*.S8 (wgmma)."""
    out = {}
    for op in ops:
        if op.split(".")[0] in ("IMMA", "IGMMA") and re.search(r"\.S8\b", op):
            out[op] = out.get(op, 0) + 1
    return out


def error_summary(e: BaseException, limit: int = 600) -> str:
    """One line for a failed compile: the exception type, where, and the cause.

    A ``CompilationError`` message is ``at L:C:``, the source lines *before* the failing one, a
    caret, then the cause on its last line: keep the first, the failing and the last line, so that
    the report names the call that failed (not a ``gl.load`` that happens to precede it).
    """
    lines = [ln.rstrip() for ln in str(e).strip().splitlines() if ln.strip()]
    if len(lines) > 3 and lines[-2].strip() == "^":
        lines = [lines[0], lines[-3].strip(), lines[-1]]
    elif len(lines) > 4 and any(ln.strip() == "^" for ln in lines):
        caret = max(i for i, ln in enumerate(lines) if ln.strip() == "^")
        lines = [lines[0], lines[caret - 1].strip(), *lines[caret + 1:]]
    return (type(e).__name__ + ": " + " | ".join(lines))[:limit]


def compile_row(variant: Variant, config, target: str, index: int | None = None) -> dict:
    """Compile one (variant, config, target); return a report row (never raises)."""
    bm, bn, bk, warps, stages = config
    row = dict(kernel=variant.name, family=variant.family, config=f"{bm}x{bn}x{bk}_w{warps}_s{stages}",
               config_index=index, target=target, num_warps=warps, num_stages=stages, ok=False)
    log = io.StringIO()
    old = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output is only printed on a fresh compile,
    knobs.compilation.always_compile = True  # so bypass the on-disk cache
    t0 = time.time()
    try:
        src = build_source(variant, bm, bn, bk)
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", TARGETS[target], 32),
                               options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=FP_FUSION))
    except Exception as e:  # noqa: BLE001 - a failed compile is a reported result
        row["error"] = error_summary(e)
        return row
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
    row["compile_s"] = round(time.time() - t0, 2)
    text = log.getvalue()
    m = re.search(r"Used (\d+) registers", text)
    sp = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    sass = _cuobjdump(["-sass"], k.asm["cubin"])
    ops = sass_opcodes(sass)
    if m is None:  # fall back to the cubin's resource usage
        ru = re.search(r"REG:(\d+)", _cuobjdump(["--dump-resource-usage"], k.asm["cubin"]))
        m = ru
    ttgir = k.asm["ttgir"]
    mv = re.search(r"nvidia_mma<\{versionMajor = (\d+)", ttgir)
    i8 = int8_mma_ops(ops)
    base = [op.split(".")[0] for op in ops]
    row.update(
        ok=True,
        n_regs=int(m.group(1)) if m else None,
        spill_bytes=(int(sp.group(1)) + int(sp.group(2))) if sp else sum(b in ("LDL", "STL") for b in base),
        shared_bytes=int(k.metadata.shared),
        shared_limit=SHARED_LIMIT[target],
        int8_mma=sum(i8.values()),
        int8_mma_ops=i8,
        mma_version=int(mv.group(1)) if mv else None,
        wgmma_wait_pendings=sorted({int(p) for p in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", ttgir)}),
        # the same waits as ptxas emitted them: WARPGROUP.DEPBAR.LE gsb0, N (N wgmma groups may stay in flight)
        sass_wgmma_waits=sorted({int(n, 16) for n in re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)", sass)}),
        # ptxas serializes wgmma (inserting its own waits) when it cannot prove the pipelining safe
        wgmma_serialized=bool(re.search(r"wgmma[^\n]*serialized", text)),
        smem_buffers=re.findall(r"ttg\.local_alloc[^\n]*?-> !ttg\.memdesc<([0-9x]+x[a-z]+[0-9]+)", ttgir),
        local_mem_ops=sum(b in ("LDL", "STL") for b in base),
        ldgsts=sum(b == "LDGSTS" for b in base),
        tma_loads=sum(b.startswith("UTMALDG") for b in base),
        sass_instructions=len(ops),
    )
    return row


def plan(targets=("sm_90", "sm_80"), names=None, subset: bool = False):
    """(variant, config, target, config index) jobs.

    ``subset=True`` compiles every variant on every target but one config each, rotating the
    config index across the variants of a family, so that every config of every list is still
    compiled by some variant (the families have at least as many variants as configs).
    """
    jobs = []
    seen = {}
    for name, v in variants().items():
        if names and name not in names:
            continue
        rank = seen.setdefault(v.family, 0)
        seen[v.family] += 1
        for target in targets:
            cfgs = list(enumerate(CONFIGS[(v.family, target)]))
            if not cfgs:
                continue
            if subset:
                cfgs = [cfgs[rank % len(cfgs)]]
            jobs += [(v, c, target, i) for i, c in cfgs]
    return jobs


def run(jobs, progress: bool = True) -> list[dict]:
    """Compile every job (tqdm progress bar); returns rows in job order."""
    it = jobs
    if progress:
        try:
            from tqdm import tqdm
            it = tqdm(jobs, desc="AOT compile", unit="kernel")
        except ImportError:
            pass
    return [compile_row(v, c, t, i) for v, c, t, i in it]


def row_problems(r) -> list[str]:
    """Gate for one row: compiled, int8 MMA present, no spills, shared memory within the target's
    limit; the Gluon kernel also keeps one wgmma in flight (TTGIR and SASS) and is not serialized."""
    where = f"{r['kernel']} {r['config']} {r['target']}"
    if not r.get("ok"):
        return [f"{where}: compile failed: {r.get('error')}"]
    out = []
    if not r["int8_mma"]:
        out.append(f"{where}: no int8 tensor-core instruction in the SASS")
    if r["spill_bytes"]:
        out.append(f"{where}: spills {r['spill_bytes']} bytes (n_regs={r['n_regs']})")
    if r["shared_bytes"] > r["shared_limit"]:
        out.append(f"{where}: shared {r['shared_bytes']} B > limit {r['shared_limit']} B")
    if r.get("family") == "gluon":  # the kernel exists to keep one int8 wgmma in flight
        if 1 not in r["wgmma_wait_pendings"] or 1 not in r["sass_wgmma_waits"]:
            out.append(f"{where}: no wgmma wait with 1 pending (TTGIR {r['wgmma_wait_pendings']}, "
                       f"SASS {r['sass_wgmma_waits']}): the MMA overlap is gone")
        if r["wgmma_serialized"]:
            out.append(f"{where}: ptxas serialized the wgmma instructions")
    return out


def problems(rows) -> list[str]:
    """Every row's gate failures (``row_problems``), in row order."""
    return [p for r in rows for p in row_problems(r)]


def to_markdown(rows) -> str:
    cols = ["kernel", "config", "target", "ok", "n_regs", "spill_bytes", "shared_bytes", "int8_mma",
            "mma_version", "wgmma_wait_pendings", "sass_wgmma_waits", "ldgsts", "tma_loads", "compile_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if isinstance(v, list):
                v = ",".join(map(str, v)) or "-"
            cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    errs = [f"- {r['kernel']} {r['config']} {r['target']}: {r['error']}" for r in rows if not r.get("ok")]
    return "\n".join(lines + ([""] + errs if errs else []))
