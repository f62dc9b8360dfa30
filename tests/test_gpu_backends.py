"""Every backend against ``reference`` on converted UNets, on the GPU machine (``pytest -m gpu``).

The GPU suite (``benchmarks/gpu_suite.py``) runs this file first in its correctness step. The CUDA tests
skip without a CUDA device. Model: the full-size DDPM CIFAR-10 UNet (35.7M parameters, random weights,
fp16 on the device), converted W8A8 and W4A8 with round-to-nearest scales (``quick_rtn_qstate``, as the
sampling benchmark does), batch 4:

* layer by layer: each quantized layer's ``triton`` output (for W8A8 linears both GEMM variants, ``tl.dot``
  and Gluon, where they apply) against the ``reference`` backend on the very input that layer sees inside
  the model. The integer sums are exact on both sides, so what remains is fp32 summation order and one
  fp16 rounding: at most an fp16 ulp or two of the layer's largest output;
* the whole network: the relative RMS difference to the reference backend stays within 5 % (one-step
  flips of quantized activations travel through ~100 layers; each layer is checked tightly above);
* CUDA-graph replay and ``torch.compile`` of a converted model give the eager output;
* a NaN in one sample makes exactly that sample NaN (issue 14);
* the ``cpu`` backend against ``reference`` on every ISA of this machine's CPU (the GPU host may have
  AVX-512 VNNI where the CI machine has AVX2 only): runs on any machine, it is quick.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BATCH = 4  # benchmarks/bench_kernels.py BACKEND_TEST_BATCH: its --precompile list compiles these shapes


@pytest.fixture(scope="module")
def no_tf32():
    """The reference backend's float convs / matmuls in true fp32 (TF32 would add ~1e-3 relative error)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def ddpm(no_tf32):
    """{bits: converted fp16 DDPM CIFAR-10 UNet on cuda, backend "triton"}."""
    from tgpq.eval.bench.models import model_spec, quick_rtn_qstate
    from tgpq.recipe import QuantConfig
    from tgpq.unet.convert import convert

    spec = model_spec("ddpm-cifar10")
    fp = spec.build(torch.device("cuda")).to(torch.float16)
    out = {}
    for bits in (8, 4):
        model = copy.deepcopy(fp)
        qs = quick_rtn_qstate(model, spec, QuantConfig(weight_bits=bits, act_bits=8, method="rtn"))
        out[bits] = convert(model, qs, backend="triton", inplace=True).eval()
    return out


def _inputs(batch=BATCH, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=gen).to("cuda", torch.float16), torch.tensor([500], device="cuda")


def _close_layer(y, ref, what):
    y, ref = y.float(), ref.float()
    assert torch.isfinite(ref).all(), what
    scale = float(ref.abs().max()) + 1e-6
    err = float((y - ref).abs().max())
    assert err <= 2.0**-9 * scale, f"{what}: max |triton - reference| {err:.3g} > 2^-9 x max |ref| {scale:.3g}"


@cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_every_layer_matches_reference_on_the_device(ddpm, bits):
    from tgpq.backends import reference
    from tgpq.backends import triton as tb
    from tgpq.nn import QConv2d, QLinear

    model = ddpm[bits]
    k = tb.kernels()
    seen = {"conv": 0, "linear": 0, "gluon": 0}

    def check(mod, inp, out):
        x = inp[0]
        if isinstance(mod, QConv2d):
            _close_layer(out, reference.conv2d(mod, x), f"conv {mod.in_channels}->{mod.out_channels} {tuple(x.shape)}")
            seen["conv"] += 1
            return
        ref = reference.linear(mod, x)
        _close_layer(out, ref, f"linear {mod.in_features}->{mod.out_features} {tuple(x.shape)}")
        seen["linear"] += 1
        if bits == 8 and mod.in_features % 64 == 0 and torch.cuda.get_device_capability()[0] == 9:
            for path in ("tl_dot", "gluon"):  # both W8A8 variants, whichever the backend chose
                y = k.qlinear(x.contiguous(), mod.w_packed, mod.w_scale, mod.a_scale, mod.group_index, mod.bias,
                              bits=8, k=mod.in_features, path=path)
                _close_layer(y, ref, f"linear {mod.in_features}->{mod.out_features} path={path}")
            seen["gluon"] += 1

    hooks = [m.register_forward_hook(check) for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
    try:
        with torch.no_grad():
            model(*_inputs())
    finally:
        for h in hooks:
            h.remove()
    assert seen["conv"] >= 60 and seen["linear"] >= 40, seen
    assert bits == 4 or torch.cuda.get_device_capability()[0] != 9 or seen["gluon"] > 0


@cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_network_output_close_to_reference(ddpm, bits):
    from tgpq.unet.convert import set_backend

    model = ddpm[bits]
    x, t = _inputs(seed=1)
    with torch.no_grad():
        y = model(x, t).sample.float()
        set_backend(model, "reference")
        try:
            ref = model(x, t).sample.float()
        finally:
            set_backend(model, "triton")
    assert torch.isfinite(y).all()
    rel = float((y - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
    assert rel <= 0.05, f"relative RMS difference to the reference backend {rel:.3g}"


@cuda
def test_cuda_graph_replay_matches_eager(ddpm):
    from tgpq.eval.bench.variants import GraphedDenoiser

    model = ddpm[8]
    x, t = _inputs(seed=2)
    with torch.no_grad():
        eager = model(x, t).sample.clone()
        graphed = GraphedDenoiser(model, x, t, None)
        x2 = torch.randn_like(x)
        y2 = graphed(x2, t).clone()
        eager2 = model(x2, t).sample
        y1 = graphed(x, t)
    for got, want in ((y1, eager), (y2, eager2)):  # same kernels on the same inputs: equal up to algorithm choice
        assert float((got.float() - want.float()).abs().max()) <= 1e-3 * float(want.float().abs().max())


@cuda
def test_torch_compile_matches_eager(no_tf32):
    """torch.compile reaches the Triton launchers through torch.ops.tgpq (small UNet: compiling is slow)."""
    from conftest import make_small_unet, minmax_qstate

    from tgpq.recipe import QuantConfig
    from tgpq.unet.convert import convert

    unet = make_small_unet().to("cuda", torch.float16)
    q = convert(unet, minmax_qstate(unet, QuantConfig(weight_bits=8, act_bits=8, method="rtn"), batch=2,
                                    timesteps=(900, 300), weight_scale="absmax",
                                    make_inputs=lambda g, b: (torch.randn(b, 3, 16, 16, generator=g).to(
                                        "cuda", torch.float16), {})),
                backend="triton")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)).to("cuda", torch.float16)
    t = torch.tensor([321], device="cuda")
    with torch.no_grad():
        eager = q(x, t).sample
        compiled = torch.compile(q, dynamic=False)(x, t).sample
    # inductor may fuse the float ops around the quantized layers differently: ulps, rare one-step flips
    rel = float((compiled.float() - eager.float()).pow(2).mean().sqrt() / eager.float().pow(2).mean().sqrt())
    assert rel <= 0.02, rel


@cuda
def test_a_nan_sample_stays_nan_and_alone(ddpm):
    x, t = _inputs(seed=4)
    x[0, 0, 5, 5] = float("nan")
    for bits in (8, 4):
        with torch.no_grad():
            y = ddpm[bits](x, t).sample
        assert torch.isnan(y[0]).all(), bits
        assert torch.isfinite(y[1:]).all(), bits


def _isas():
    from tgpq.backends import cpu as cb
    from tgpq.backends import library
    return cb.supported_isas() if library.has_extension() else []


@pytest.mark.parametrize("isa", _isas())
def test_cpu_backend_every_isa_matches_reference(isa):
    """Each quantized layer of a converted small UNet (W8A8 and W4A8) on this CPU's ISAs vs the reference."""
    from conftest import make_small_unet, minmax_qstate

    from tgpq.backends import cpu as cb
    from tgpq.backends import reference
    from tgpq.nn import QConv2d, QLinear
    from tgpq.recipe import QuantConfig
    from tgpq.unet.convert import convert, set_backend
    from tgpq.unet.cpu_fusion import unfuse_for_cpu

    unet = make_small_unet()
    for bits in (8, 4):
        q = convert(unet, minmax_qstate(unet, QuantConfig(weight_bits=bits, act_bits=8, method="rtn"), batch=2,
                                        timesteps=(900, 300), weight_scale="absmax"))
        set_backend(q, "cpu")
        unfuse_for_cpu(q)  # every layer through its module call, so the hooks see each one
        seen = []

        def check(mod, inp, out):
            ref = (reference.conv2d if isinstance(mod, QConv2d) else reference.linear)(mod, inp[0])
            assert (out - ref).abs().max() <= 1e-5 * (ref.abs().max() + 1), (isa, bits, type(mod).__name__)
            seen.append(mod)

        hooks = [m.register_forward_hook(check) for m in q.modules() if isinstance(m, (QConv2d, QLinear))]
        try:
            with cb.force_isa(isa), torch.no_grad():
                q(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([900]))
        finally:
            for h in hooks:
                h.remove()
        assert len(seen) > 20
