"""Autotune spaces for the Triton kernels, per target family.

Each entry is ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``. The lists are small on
purpose (autotuning runs once per shape family and dtype on first use). Every config here is
compiled ahead of time for its target by ``benchmarks/compile_check.py`` (and the CI test): it must
emit int8 tensor-core instructions, spill nothing and fit the target's shared memory.

* ``SM90_*`` run on Hopper (wgmma, ``IGMMA.64xNx32.S8.S8``) and newer.
* ``SM80_*`` run on Ampere/Ada (``IMMA.16832.S8.S8``). Large int32 accumulators on 4 warps do
  not fit the register file there: with triton 3.9, 128x256x64 on 4 warps collapses to 32
  registers and spills ~17 KB, 128x128x128 spills 124 B, 128x128x64 just fits (234 registers).
  So the sm_80 lists keep tiles <= 128x128 and give the 128x128 tile 8 warps.

``INTERPRETER`` is the single config used when the kernels run through Triton's CPU
interpreter (tests): small tiles keep it fast while still exercising masking on odd shapes.
"""
from __future__ import annotations

import triton

GEMM_SM90 = (
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (64, 128, 128, 4, 4),
    (64, 64, 256, 4, 3),
)
GEMM_SM80 = (
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 128, 4, 3),
)
CONV_SM90 = (
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (64, 128, 64, 4, 4),
)
CONV_SM80 = (
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
)
INTERPRETER = (32, 32, 32, 4, 1)
# The autotuner times each config with triton.testing.do_bench; its defaults (25 ms warm-up, 100 ms of
# repeats per config) cost ~0.5 s per new shape family over 3-4 configs, and a converted DDPM UNet meets
# ~25 families per batch size. 5 / 25 ms still repeats a 0.1 ms kernel 250 times (the median decides).
AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 25


def autotune_bench():
    """The autotuner's ``do_bench``: ``triton.testing.do_bench`` with AUTOTUNE_WARMUP_MS / AUTOTUNE_REP_MS."""
    import functools

    import triton.testing

    return functools.partial(triton.testing.do_bench, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS)


def to_triton(entries, **extra):
    """``(BM, BN, BK, warps, stages)`` tuples -> ``triton.Config`` list (``extra`` kwargs added)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **extra},
                          num_warps=w, num_stages=s) for bm, bn, bk, w, s in entries]


def family(capability: tuple[int, int]) -> str:
    """'sm90' for compute capability >= 9.0, else 'sm80' (the Ampere list also serves sm_86/89)."""
    return "sm90" if capability[0] >= 9 else "sm80"


def m_bucket(m: int) -> int:
    """Autotune key for the M dimension: next power of two, at least 16 (a shape family)."""
    return max(16, 1 << (max(1, m) - 1).bit_length())
