"""The cpu backend's fused paths between layers: GroupNorm + SiLU + quantize over a concatenation's parts
(``groupnorm_silu_quantize_split``), the cat-free decoder blocks (``tgpq.unet.cpu_skips``) and the uint8
entry of a linear layer (``linear_u8``, fed by the attention block's fused GroupNorm)."""
import pytest
import torch

from tgpq.backends import cpu as cb
from tgpq.nn import QConv2d

CL = torch.channels_last


def _layer(c: int, scale: float) -> QConv2d:
    layer = QConv2d(c, 4, 1, bits=8, num_groups=2)
    layer.a_scale.copy_(torch.tensor([scale, 2 * scale]))
    layer.set_group(0)
    return layer


def _case(gen, b, c0, c1, h, w, groups):
    a = (torch.randn(b, c0, h, w, generator=gen) * 2 + 0.5).contiguous(memory_format=CL)
    s = torch.randn(b, c1, h, w, generator=gen) * 0.7 - 1
    norm = torch.nn.GroupNorm(groups, c0 + c1, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=gen)
        norm.bias.uniform_(-0.3, 0.3, generator=gen)
    return a, s, norm


# groups that straddle the boundary (40 | 56 in groups of 12), a single image, 1x1 pixels, a tiny odd image
SHAPES = [(3, 40, 56, 5, 7, 8), (1, 12, 20, 9, 3, 4), (2, 64, 64, 1, 1, 32), (17, 8, 24, 3, 2, 4)]


@pytest.mark.parametrize("isa", cb.supported_isas())
@pytest.mark.parametrize("shape", SHAPES)
def test_split_norm_is_the_whole_norm_cut_at_the_boundary(isa, shape):
    """With one scale for both parts, the split op's outputs are the whole op's on the concatenation, bit for
    bit, whether the parts are separate tensors or channel slices of the concatenation (read in place)."""
    gen = torch.Generator().manual_seed(sum(shape))
    a, s, norm = _case(gen, *shape)
    c0 = shape[1]
    cat = torch.cat([a, s], 1).contiguous(memory_format=CL)
    with cb.force_isa(isa):
        whole = cb.groupnorm_silu_quantize(norm, cat, _layer(cat.shape[1], 0.031))
        parts = cb.groupnorm_silu_quantize_split(norm, [a, s], [_layer(c0, 0.031), _layer(shape[2], 0.031)])
        views = cb.groupnorm_silu_quantize_split(norm, list(torch.split(cat, [c0, shape[2]], 1)),
                                                 [_layer(c0, 0.031), _layer(shape[2], 0.031)])
    assert [p.shape for p in parts] == [(shape[0], shape[3], shape[4], c) for c in shape[1:3]]
    assert torch.equal(torch.cat(parts, 3), whole) and torch.equal(torch.cat(views, 3), whole)


@pytest.mark.parametrize("isa", cb.supported_isas())
def test_split_norm_quantizes_each_part_with_its_own_scale(isa):
    """Against a float64 GroupNorm + SiLU over the concatenation, each part quantized with its layer's scale:
    at most one step off (the float32 statistics and exp move values near a rounding boundary), and
    nearly always exact."""
    gen = torch.Generator().manual_seed(5)
    a, s, norm = _case(gen, 3, 40, 56, 6, 5, 8)
    layers = [_layer(40, 0.013), _layer(56, 0.047)]
    layers[1].set_group(1)  # the second table entry: 0.094
    with cb.force_isa(isa):
        us = cb.groupnorm_silu_quantize_split(norm, [a, s], layers)
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(
        torch.cat([a, s], 1).double(), 8, norm.weight.double(), norm.bias.double(), norm.eps))
    for u, r, scale in zip(us, torch.split(ref, [40, 56], 1), (0.013, 0.094)):
        q = (r / scale).round().clamp(-127, 127) + 128
        diff = (u.permute(0, 3, 1, 2).double() - q).abs()
        assert diff.max() <= 1 and (diff > 0).double().mean() < 1e-3


@pytest.mark.parametrize("isa", cb.supported_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joined_outputs_are_the_concatenations(isa, dtype):
    """One layer for all parts: the norm writes one tensor of the concatenation's channels, equal to the op on
    the materialised concatenation (separate parts, slices of it, bfloat16)."""
    gen = torch.Generator().manual_seed(9)
    a, s, norm = _case(gen, 3, 40, 56, 6, 5, 8)
    a, s = a.to(dtype), s.to(dtype)
    cat = torch.cat([a, s], 1).contiguous(memory_format=CL)
    layer = _layer(96, 0.021)
    with cb.force_isa(isa):
        for xs in ([a, s], list(torch.split(cat, [40, 56], 1))):
            assert torch.equal(cb.groupnorm_silu_quantize_split(norm, xs, [layer])[0],
                               cb.groupnorm_silu_quantize(norm, cat, layer))


@pytest.mark.parametrize("isa", cb.supported_isas())
def test_norm_also_writes_the_plain_quantization_of_its_input(isa):
    """From one read: the norm's outputs as without the extra outputs, and the input's plain quantization as
    ``quantize_nhwc`` writes it, per part (a split shortcut) or joined (a plain shortcut), bit for bit."""
    gen = torch.Generator().manual_seed(13)
    a, s, norm = _case(gen, 3, 40, 56, 6, 5, 8)
    layers, plain = [_layer(40, 0.02), _layer(56, 0.03)], [_layer(40, 0.05), _layer(56, 0.07)]
    joined = _layer(96, 0.06)
    with cb.force_isa(isa):
        us = cb.groupnorm_silu_quantize_split(norm, [a, s], layers)
        us2, vs = cb.groupnorm_silu_quantize_and_input(norm, [a, s], layers, plain)
        us3, (v,) = cb.groupnorm_silu_quantize_and_input(norm, [a, s], [joined], [joined])
        assert all(torch.equal(p, q) for p, q in zip(us, us2)) and len(vs) == 2
        assert all(torch.equal(vq, cb.quantize_nhwc(m, x)) for vq, m, x in zip(vs, plain, (a, s)))
        assert torch.equal(v, cb.quantize_nhwc(joined, torch.cat([a, s], 1)))
        assert torch.equal(us3[0], cb.groupnorm_silu_quantize_split(norm, [a, s], [joined])[0])


def test_split_norm_refuses_parts_of_other_sizes():
    a, s, norm = _case(torch.Generator().manual_seed(0), 2, 8, 8, 4, 4, 4)
    with pytest.raises(RuntimeError, match="differ in batch or spatial size"):
        cb.groupnorm_silu_quantize_split(norm, [a, s[:, :, :3]], [_layer(8, 0.1), _layer(8, 0.1)])
    with pytest.raises(RuntimeError, match="do not split into"):
        cb.groupnorm_silu_quantize_split(torch.nn.GroupNorm(4, 16), [a, s[:, :7]], [_layer(8, 0.1), _layer(7, 0.1)])


def _fused_pair(unet_and_state, **call):
    """(model with cat-free decoder blocks, the same model whose decoder blocks concatenate) outputs."""
    from tgpq.unet.convert import convert
    from tgpq.unet.cpu_skips import unfuse_up_block

    unet, qstate = unet_and_state
    q = convert(unet, qstate, backend="cpu")
    patched = [m for m in q.modules() if getattr(m, "_tgpq_orig_up_forward", None) is not None]
    with torch.no_grad():
        y_skip = q(**call).sample
        for m in patched:
            unfuse_up_block(m)
        y_cat = q(**call).sample
    return patched, y_skip, y_cat


def test_decoder_blocks_without_cat_compute_the_same_bits():
    """DDPM layout (UpBlock2D, AttnUpBlock2D): every decoder block is patched and the output equals the
    concatenating path's bit for bit; both stay close to the reference backend."""
    from conftest import make_small_unet, minmax_qstate

    from tgpq.recipe import QuantConfig

    unet = make_small_unet()
    qs = minmax_qstate(unet, QuantConfig(weight_bits=8, act_bits=8, method="rtn"), batch=2, timesteps=(900, 300))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    patched, y_skip, y_cat = _fused_pair((unet, qs), sample=x, timestep=torch.tensor([700]))
    assert sorted(type(m).__name__ for m in patched) == ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]
    assert torch.equal(y_skip, y_cat)
    with torch.no_grad():
        y_float = unet(x, torch.tensor([700])).sample
    assert (y_skip - y_float).pow(2).mean() <= 0.05 * y_float.pow(2).mean()


def _split_qstate(unet, qs, x, t):
    """``qs`` with every decoder resnet's conv1 and conv_shortcut quantized per half (split quantization, as
    block calibration writes it): the skip half's activation scale 1.7x the first half's."""
    import dataclasses

    skips = {}

    def grab(block, args, kwargs):
        res = args[1] if len(args) > 1 else kwargs["res_hidden_states_tuple"]
        for j, r in enumerate(block.resnets):
            skips[r] = res[-1 - j].shape[1]

    hooks = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in unet.up_blocks]
    with torch.no_grad():
        unet(x, t)
    for h in hooks:
        h.remove()
    layers = dict(qs.layers)
    for name, r in unet.named_modules():
        if r in skips:
            for conv in ("conv1", "conv_shortcut"):
                lq = layers[f"{name}.{conv}"]
                c = lq.weight_q.shape[1]
                layers[f"{name}.{conv}"] = dataclasses.replace(
                    lq, act_scale=torch.stack([lq.act_scale, 1.7 * lq.act_scale], 1), in_splits=(c - skips[r], skips[r]))
    return dataclasses.replace(qs, layers=layers)


def test_split_decoder_convs_without_cat_compute_the_same_bits():
    """Decoder resnets with split conv1 / conv_shortcut (one activation scale per half): the halves go to the
    parts directly, bit for bit the concatenating path's result."""
    from conftest import make_small_unet, minmax_qstate

    from tgpq.nn import QSplitConv2d
    from tgpq.recipe import QuantConfig

    unet = make_small_unet()
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)), torch.tensor([200])
    qs = _split_qstate(unet, minmax_qstate(unet, QuantConfig(weight_bits=8, act_bits=8, method="rtn"), batch=2,
                                           timesteps=(900, 300)), x, t)
    patched, y_skip, y_cat = _fused_pair((unet, qs), sample=x, timestep=t)
    assert len(patched) == 3
    assert all(isinstance(r.conv1, QSplitConv2d) and r._tgpq_split1 for b in patched for r in b.resnets)
    assert torch.equal(y_skip, y_cat)
    with torch.no_grad():
        y_float = unet(x, t).sample
    assert (y_skip - y_float).pow(2).mean() <= 0.05 * y_float.pow(2).mean()


def test_cross_attention_decoder_block_without_cat():
    """Stable-Diffusion layout (UpBlock2D, CrossAttnUpBlock2D with text embeddings): the same bits as
    the concatenating path."""
    from test_conditional_unet import _inputs, conditional_minmax_qstate, make_conditional_unet

    from tgpq import QuantConfig

    unet = make_conditional_unet()
    qs = conditional_minmax_qstate(unet, QuantConfig(weight_bits=8, method="rtn"))
    x, emb = _inputs(4)
    patched, y_skip, y_cat = _fused_pair((unet, qs), sample=x, timestep=torch.tensor([400]),
                                         encoder_hidden_states=emb)
    assert sorted(type(m).__name__ for m in patched) == ["CrossAttnUpBlock2D", "UpBlock2D"]
    assert torch.equal(y_skip, y_cat)


def test_decoder_block_falls_back_with_autograd_and_unfuses():
    from conftest import make_small_unet, minmax_qstate

    from tgpq.recipe import QuantConfig
    from tgpq.unet.convert import convert
    from tgpq.unet.cpu_fusion import fuse_for_cpu, unfuse_for_cpu

    unet = make_small_unet()
    q = convert(unet, minmax_qstate(unet, QuantConfig(weight_bits=8, act_bits=8, method="rtn"), batch=2,
                                    timesteps=(900,)), backend="cpu")
    x, t = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([900])
    y_grad = q(x, t).sample.detach()  # autograd on: the original code everywhere
    unfuse_for_cpu(q)
    assert not any(hasattr(m, "_tgpq_orig_up_forward") or hasattr(m, "_tgpq_split1") for m in q.modules())
    assert torch.equal(q(x, t).sample.detach(), y_grad)
    assert fuse_for_cpu(q)["up_blocks"] == 3


@pytest.mark.parametrize("isa", cb.supported_isas())
def test_linear_u8_is_linear_on_the_quantized_rows(isa):
    """``linear_u8`` over the rows ``quantize_nhwc`` writes: bit for bit ``linear`` on the microkernels (same
    int32 sums, same epilogue); oneDNN, where exact, within float32 rounding of the epilogue."""
    from tgpq.backends import onednn
    from tgpq.nn import QLinear

    gen = torch.Generator().manual_seed(21)
    layer = QLinear(72, 40, 8, 2, bias=True)
    with torch.no_grad():
        layer.w_packed.copy_(torch.randint(-127, 128, layer.w_packed.shape, generator=gen, dtype=torch.int8))
        layer.w_scale.copy_(torch.rand(40, generator=gen) * 0.01 + 1e-3)
        layer.a_scale.copy_(torch.tensor([0.03, 0.05]))
        layer.bias.copy_(torch.randn(40, generator=gen))
    layer.set_group(1)
    x = torch.randn(37, 72, generator=gen) * 2
    xq = cb.quantize_nhwc(layer, x.t()[None, :, :, None]).reshape(37, 72)
    with cb.force_isa(isa), torch.no_grad():
        with cb.force_kernel("ukernel"):
            y = cb.linear(layer, x)
            assert torch.equal(cb.linear_u8(layer, xq), y)
        if onednn.available() and onednn.exact_on(isa):
            with cb.force_kernel("onednn"):
                assert (cb.linear_u8(layer, xq) - y).abs().max() <= 1e-5 * (y.abs().max() + 1)


def test_attention_block_fuses_its_group_norm():
    """The fused attention block (GroupNorm + quantize in one pass) against the unfused cpu path: a float32
    ulp of the norm moves a quantized value by one step at most, so outputs agree to well under 1 %."""
    from conftest import make_small_unet, minmax_qstate
    from diffusers.models.attention_processor import Attention

    from tgpq.recipe import QuantConfig
    from tgpq.unet.convert import convert
    from tgpq.unet.cpu_fusion import CpuAttnProcessor

    unet = make_small_unet()
    q = convert(unet, minmax_qstate(unet, QuantConfig(weight_bits=8, act_bits=8, method="rtn"), batch=2,
                                    timesteps=(500,)), backend="cpu")
    attn = next(m for m in q.modules() if isinstance(m, Attention))
    assert isinstance(attn.processor, CpuAttnProcessor) and isinstance(attn.group_norm, torch.nn.GroupNorm)
    x = torch.randn(2, attn.group_norm.num_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = attn(x)
        y_plain = attn.processor.original(attn, x)
    assert (y - y_plain).pow(2).mean().sqrt() <= 0.005 * y_plain.pow(2).mean().sqrt()



@pytest.mark.parametrize("isa", cb.supported_isas())
def test_norm_with_row_bias_is_the_norm_of_the_sum(isa):
    """``row_bias`` [B, C] enters the norm without being written: against a float64 GroupNorm + SiLU of
    ``x + row_bias``, at most one quantization step off and nearly always exact; both ops, large offsets too."""
    gen = torch.Generator().manual_seed(8)
    a, s, norm = _case(gen, 3, 40, 56, 6, 5, 8)
    rb = torch.randn(3, 96, generator=gen) * 5
    layer = _layer(96, 0.02)
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(
        torch.cat([a, s], 1).double() + rb.double()[:, :, None, None], 8, norm.weight.double(),
        norm.bias.double(), norm.eps))
    q = ((ref / 0.02).round().clamp(-127, 127) + 128).permute(0, 2, 3, 1)
    with cb.force_isa(isa):
        outs = (cb.groupnorm_silu_quantize(norm, torch.cat([a, s], 1), layer, row_bias=rb),
                cb.groupnorm_silu_quantize_split(norm, [a, s], [layer], row_bias=rb)[0])
    for u in outs:
        diff = (u.double() - q).abs()
        assert diff.max() <= 1 and (diff > 0).double().mean() < 1e-3
    with pytest.raises(RuntimeError, match="row_bias must be floating"):
        cb.groupnorm_silu_quantize(norm, torch.cat([a, s], 1), layer, row_bias=rb[:, :5])


@pytest.mark.parametrize("isa", cb.supported_isas())
@pytest.mark.parametrize("pad", [(0, 1, 0, 1), (2, 0, 1, 3), (0, 0, 0, 0)])
def test_quantize_writes_the_zero_border_of_a_padded_input(isa, pad):
    """``quantize_nhwc(x, pad=...)`` is ``quantize_nhwc(F.pad(x, pad))`` bit for bit, for channels_last, NCHW
    and channel-slice inputs: the border is code 128, the quantized zero."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(sum(pad) + 7)
    cat = (torch.randn(3, 40, 5, 7, generator=gen) * 3).contiguous(memory_format=CL)
    layer = _layer(24, 0.021)
    for x in (cat[:, :24], cat[:, 16:].contiguous(), cat[:, 16:].contiguous(memory_format=CL)):
        with cb.force_isa(isa):
            got = cb.quantize_nhwc(layer, x, pad=pad)
            want = cb.quantize_nhwc(layer, F.pad(x, pad))
        assert got.shape == (3, 5 + pad[2] + pad[3], 7 + pad[0] + pad[1], 24)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="pad must be 4 non-negative"):
        cb.quantize_nhwc(layer, cat[:, :24], pad=(0, -1, 0, 1))


@pytest.mark.parametrize("kernel", ["ukernel", "onednn"])
def test_downsampler_quantizes_into_its_padding_without_a_padded_copy(kernel):
    """DDPM's Downsample2D (``F.pad(x, (0, 1, 0, 1))`` then a stride-2 conv): the fused forward never pads the
    float tensor (no ``constant_pad_nd``) and returns the original forward's bits."""
    from conftest import make_small_unet, minmax_qstate
    from torch.utils._python_dispatch import TorchDispatchMode

    from tgpq.backends import onednn
    from tgpq.recipe import QuantConfig
    from tgpq.unet.convert import convert

    if kernel == "onednn" and not onednn.available():
        pytest.skip("oneDNN's int8 ops are not in this torch build")

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__)
            return func(*args, **(kwargs or {}))

    unet = make_small_unet()
    q = convert(unet, minmax_qstate(unet, QuantConfig(weight_bits=8, act_bits=8, method="rtn"), batch=2,
                                    timesteps=(900,)), backend="cpu")
    downs = [m for m in q.modules() if type(m).__name__ == "Downsample2D"]
    assert downs and all(getattr(m, "_tgpq_orig_forward", None) is not None for m in downs)
    gen = torch.Generator().manual_seed(11)
    for m in downs:
        x = torch.randn(2, m.channels, 8, 6, generator=gen).contiguous(memory_format=CL)
        with torch.no_grad(), cb.force_kernel(kernel):
            with Ops() as ops:
                y = m(x)
            want = m._tgpq_orig_forward(x)
        assert not any(n.startswith("constant_pad_nd") for n in ops.names), ops.names
        assert y.shape == want.shape == (2, m.out_channels, 4, 3)
        assert torch.equal(y, want)
