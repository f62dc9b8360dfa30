"""The CUDA sources in csrc/cuda/ compile with nvcc for sm_90a and hold the intended instructions.

No GPU and no CUDA build of torch are needed: each .cu file (plain CUDA with extern "C"
launchers) is compiled to a cubin with ``-gencode=arch=compute_90a,code=sm_90a`` and its SASS is
read with cuobjdump (the toolkit's, else the one bundled with the triton wheel). Skipped cleanly
when nvcc is absent. The torch binding (cuda_ops_binding.cpp) needs a CUDA build of torch's
headers and is compiled by ``pip install .`` on such a machine, not here.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")


def _nvcc():
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


def _cuobjdump():
    for cand in (shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if cand and os.path.exists(cand):
            return cand
    try:
        from triton import knobs
        path = knobs.nvidia.cuobjdump.path
        return path if path and os.path.exists(path) else None
    except Exception:  # noqa: BLE001 - triton absent or without bundled tools
        return None


NVCC, CUOBJDUMP = _nvcc(), _cuobjdump()
pytestmark = pytest.mark.skipif(NVCC is None or CUOBJDUMP is None, reason="needs nvcc and cuobjdump")


@functools.lru_cache(maxsize=None)
def sass_of(name: str, tmp=None) -> dict:
    """Compile csrc/cuda/<name> for sm_90a; return {kernel symbol: [opcodes]}."""
    import tempfile
    out = os.path.join(tempfile.mkdtemp(prefix="tgpq_nvcc_"), name + ".cubin")
    cmd = [NVCC, "-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "-cubin", "-o", out,
           os.path.join(CUDA_DIR, name)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"nvcc failed:\n{res.stderr}"
    sass = subprocess.run([CUOBJDUMP, "-sass", out], capture_output=True, text=True, check=True).stdout
    funcs, cur = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        m = re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and cur:
            funcs[cur].append(m.group(1))
    return funcs


def _one(funcs, *parts):
    hits = [f for f in funcs if all(p in f for p in parts)]
    assert len(hits) == 1, (parts, list(funcs))
    return funcs[hits[0]]


def test_quantize_act_vector_kernels_use_wide_accesses_and_round_to_nearest():
    funcs = sass_of("quantize_act.cu")
    for ty in ("6__half", "13__nv_bfloat16"):
        ops = _one(funcs, "quantize_act_vec8_kernel", ty)
        assert any(op.startswith("LDG.E.128") for op in ops), "x is not read with 16-byte loads"
        assert "STG.E.64" in ops, "int8 output is not written with 8-byte stores"
        f2i = [op for op in ops if op.startswith("F2I")]
        # round half to even: plain F2I (shown as F2I.NTZ), never the TRUNC/FLOOR/CEIL forms
        assert len(f2i) >= 8 and all(op == "F2I.NTZ" for op in f2i), f2i
        assert sum(op.startswith("FMNMX") for op in ops) >= 16  # clamp to [-127, 127]
        assert not any(op.split(".")[0] in ("LDL", "STL") for op in ops), "local memory (spills)"
    for ty in ("6__half", "13__nv_bfloat16"):
        assert _one(funcs, "quantize_act_scalar_kernel", ty)


def test_int4_pack_kernels():
    funcs = sass_of("int4_pack.cu")
    pack = _one(funcs, "16pack_int4_kernel")  # mangled name: length prefix keeps unpack out
    assert any(op.startswith(("RED", "ATOM")) for op in pack), "pack must flag out-of-range values atomically"
    assert any(op.startswith("STG.E.U8") for op in pack)
    unpack = _one(funcs, "18unpack_int4_kernel")
    assert any(op.startswith("SHF.R.S32") or op.startswith("SGXT") for op in unpack), \
        "high nibble must be sign-extended by an arithmetic shift"
    for ops in (pack, unpack):
        assert not any(op.split(".")[0] in ("LDL", "STL") for op in ops)


def test_binding_registers_every_extern_launcher():
    """Every extern "C" launcher defined in a .cu file is declared and used by the torch binding."""
    binding = open(os.path.join(CUDA_DIR, "cuda_ops_binding.cpp")).read()
    for name in sorted(os.listdir(CUDA_DIR)):
        if name.endswith(".cu"):
            for fn in re.findall(r'extern "C" int (\w+)\(', open(os.path.join(CUDA_DIR, name)).read()):
                assert binding.count(fn) >= 2, f"{fn} from {name} is not declared and called in the binding"
    assert 'TORCH_LIBRARY_IMPL(tgpq, CUDA, m)' in binding


def _cuda_ops():
    import torch
    if not torch.cuda.is_available():
        return None
    try:
        import tgpq._C  # noqa: F401 - registers the ops
    except ImportError:
        return None
    return torch.ops.tgpq


@pytest.mark.gpu
def test_cuda_ops_match_reference_on_device():
    """On a GPU with the extension built: bit-exact against tgpq.numerics / the CPU packing."""
    import torch
    ops = _cuda_ops()
    if ops is None:
        pytest.skip("needs a CUDA device and tgpq._C built with CUDA")
    from tgpq.numerics import quantize_act
    gen = torch.Generator().manual_seed(0)
    a_scale = torch.rand(4, generator=gen) * 0.05 + 0.01
    for dtype in (torch.float16, torch.bfloat16):
        for n in (1, 7, 8 * 1000 + 5):
            x = (torch.randn(n, generator=gen) * 60 * a_scale[3]).to(dtype)
            q = ops.quantize_act(x.cuda(), a_scale.cuda(), torch.tensor([3], device="cuda")).cpu()
            assert torch.equal(q, quantize_act(x, a_scale[3]))
    w = torch.randint(-8, 8, (33, 77), dtype=torch.int8, generator=gen)
    packed = ops.pack_int4(w.cuda())
    assert torch.equal(packed.cpu(), ops.pack_int4(w))
    assert torch.equal(ops.unpack_int4(packed, 77).cpu(), w)
