"""CPU backend: register-tiled int8 microkernels of the C++ extension (``torch.ops.tgpq.*``).

Contract (shared with every backend, ``tgpq.numerics``): ``x_q = clamp(rne(x * (1/a_scale[g])), -127,
127)``, exact int32 ``sum_k x_q * w_q``, ``y = acc * (a_scale[g] * w_scale[n]) + bias[n]``. The kernels
apply the epilogue as one fma, so they differ from the reference backend only by float32 rounding of
the epilogue (and of the reference's own float GEMM).

Weights are repacked ONCE per layer into the microkernels' c4-block layout (``tgpq.layout``):
``prepare(layer)`` caches two non-persistent buffers on the layer (``_cpu_w_c4`` int8 and ``_cpu_wsum``
int32); they are rebuilt lazily when missing or when ``w_packed`` was modified in place (e.g. by
``load_state_dict``). int4 weights stay int4 in that layout (half the bytes of int8) and are unpacked
in registers. A layer that oneDNN serves for every input shape it has seen (auto mode) drops this copy
(oneDNN keeps its own); it is rebuilt when the microkernels are needed again (a NaN input, a shape they
win), and layers a torch.compile graph reads keep it.

Which ISA path and kernel family serve a call is ``tgpq.backends.cpu_dispatch``'s (re-exported here).
ISA paths: ``avx512vnni`` (vpdpbusd, 4x64 tiles), ``avx2`` and ``scalar``. The path is chosen once, at
first use: ``TGPQ_CPU_ISA=<name>`` if set, else the best this CPU supports; ``set_isa(name)`` /
``force_isa(name)`` change it for every later call.

Kernel family per layer (``kernel_for``): tgpq's microkernels (``"ukernel"``) or oneDNN's int8 conv /
linear (``"onednn"``, ``tgpq.backends.onednn``). ``TGPQ_CPU_KERNEL`` / ``set_kernel``: ``"auto"`` (default)
measures both at the first call and keeps the faster, where oneDNN is exact (AVX-512 VNNI), once per layer
geometry and input shape in the process (every layer of that geometry then uses the same: copies of one
model agree bit for bit; another process may measure otherwise, within the same error bound); elsewhere
(AVX2: oneDNN saturates) the microkernels serve. ``"ukernel"`` / ``"onednn"`` force one (tests; oneDNN on
AVX2 only with 7-bit weights). ``served_by(layer)`` tells which served each shape. Convolutions return
channels_last float32 (the input's dtype for bfloat16 / float16 input); linear returns contiguous ``[..., N]``.
"""
from __future__ import annotations

import torch

from . import library, onednn
from .cpu_dispatch import (ISA_IDS, KERNELS, best_isa, current_isa, force_isa, force_kernel,  # noqa: F401
                           kernel_for, kernel_mode, served_by, set_isa, set_kernel, supported_isas)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # computed in float32, returned in the input's dtype


def _group_scale(layer) -> float:
    return float(layer.a_scale[int(layer.group_index)])


def _onednn_ok(xq: torch.Tensor) -> bool:
    """oneDNN cannot carry a NaN activation (the u8 code 0): such inputs go to the microkernels. (``min`` is
    one vectorised pass; ``(xq == 0).any()`` cost as much as the int8 conv itself on a 1x1 layer.)"""
    return xq.numel() == 0 or int(xq.min()) != 0


def _isa_id() -> int:
    return ISA_IDS[current_isa()]


def state_key(*tensors: torch.Tensor) -> tuple:
    """Identity of tensors' current contents: storage and in-place version (inference tensors, which keep no
    version counter and can only change inside inference mode, by storage alone)."""
    return tuple((t.data_ptr(), t.device, -1 if t.is_inference() else t._version) for t in tensors)


def prepare(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Repack ``layer``'s weight into the microkernel layout once; returns ``(w_c4, wsum)``.

    ``w_c4``: int8 ``[ceil(N/16), block_bytes]``; ``wsum``: int32 ``[16 * ceil(N/16)]`` (128 * row sums of
    the weight, the zero-point compensation). Cached as non-persistent buffers on the layer. Under
    ``torch.compile`` the cached buffers are used as they are (``convert`` prepares every layer) and the layer
    keeps them from then on; a layer whose buffers were released (``_release_ukernel_weights``) is repacked
    inside the compiled graph (correct, slower: compile before the first eager call to avoid it).
    """
    if torch.compiler.is_compiling():
        layer._cpu_keep_c4 = True  # a side effect dynamo replays: later eager calls keep what the graph reads
        if getattr(layer, "_cpu_w_c4", None) is None:
            return torch.ops.tgpq.prepack_c4(layer.w_packed, layer.bits, layer.k)
        return layer._cpu_w_c4, layer._cpu_wsum
    library.require_extension()
    current_isa()  # the ISA path is chosen here at the latest (before any torch.compile trace)
    key = (state_key(layer.w_packed), layer.bits)
    if getattr(layer, "_cpu_w_c4", None) is not None and getattr(layer, "_cpu_key", None) == key:
        return layer._cpu_w_c4, layer._cpu_wsum
    w_c4, wsum = torch.ops.tgpq.prepack_c4(layer.w_packed.cpu(), layer.bits, layer.k)
    layer.register_buffer("_cpu_w_c4", w_c4, persistent=False)
    layer.register_buffer("_cpu_wsum", wsum, persistent=False)
    object.__setattr__(layer, "_cpu_key", key)
    return w_c4, wsum


def _release_ukernel_weights(layer) -> None:
    """Drop ``layer``'s microkernel copy of its weight once oneDNN serves every shape it has seen (auto mode):
    oneDNN holds its own packed copy, and two would double the weight memory. ``prepare`` rebuilds it if the
    microkernels are needed again (a new shape they win, a NaN input). Layers a torch.compile graph reads keep it."""
    if getattr(layer, "_cpu_w_c4", None) is not None and not getattr(layer, "_cpu_keep_c4", False):
        layer._cpu_w_c4 = None
        layer._cpu_wsum = None


def _choose(layer, shape: tuple, ours, theirs) -> str:
    return kernel_for(layer, shape, ours, theirs, on_onednn_only=_release_ukernel_weights)


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"cpu backend expects a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"cpu backend got a tensor on {x.device}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"cpu backend: input must be float32, bfloat16 or float16, got {x.dtype}")


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    """``[..., in_features]`` float32/bfloat16 -> ``[..., out_features]`` (the input's dtype)."""
    _check_input(x)
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"qlinear: input has {x.shape[-1]} features, the layer expects {layer.in_features}")

    def ours():
        w_c4, wsum = prepare(layer)
        return torch.ops.tgpq.qlinear(x, w_c4, wsum, layer.w_scale, layer.a_scale, layer.group_index, layer.bias,
                                      layer.bits, layer.out_features_, layer.in_features, _isa_id())

    if _choose(layer, tuple(x.shape), ours, lambda: _onednn_linear(layer, x)) == "onednn":
        return _onednn_linear(layer, x, fallback=ours)
    return ours()


def _onednn_packed(layer):
    """oneDNN's prepacked weight of ``layer`` (rebuilt when its weight or scales change)."""
    return onednn.prepare(layer, (state_key(layer.w_packed, layer.w_scale), layer.bits))


def _onednn_linear_u8(layer, xq: torch.Tensor, fallback=None) -> torch.Tensor:
    """oneDNN's linear over uint8 rows ``xq`` ``[M, K]``; an input holding a NaN code goes to ``fallback``."""
    if fallback is not None and not _onednn_ok(xq):
        return fallback()
    return onednn.linear_u8(layer, _onednn_packed(layer), xq, _group_scale(layer))


def _onednn_linear(layer, x: torch.Tensor, fallback=None) -> torch.Tensor:
    x2 = x.reshape(-1, layer.in_features)
    y = _onednn_linear_u8(layer, quantize_nhwc(layer, x2[:, :, None, None]).reshape(x2.shape), fallback)
    return y.reshape(*x.shape[:-1], layer.out_features_).to(x.dtype)


def _conv_args(layer):
    return (layer.bits, layer.out_channels, layer.in_channels, list(layer.kernel_size), list(layer.stride),
            list(layer.padding), list(layer.dilation))


def conv2d(layer, x: torch.Tensor, row_bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, Cin, H, W]`` float32/bfloat16 (channels_last is read without a copy) -> channels_last
    ``[B, N, Ho, Wo]``; the quantization to u8 NHWC is one pass, then the implicit GEMM.

    ``row_bias`` ``[B, N]`` and ``residual`` ``[B, N, Ho, Wo]`` (optional) are added to the output
    while it is in cache: ``(conv + row_bias[:, :, None, None]) + residual``, the same float32 adds."""
    _check_input(x)
    if x.dim() != 4 or x.shape[1] != layer.in_channels:
        raise ValueError(f"qconv2d: expected input [B, {layer.in_channels}, H, W] ({layer.in_channels} channels), "
                         f"got {tuple(x.shape)}")

    def ours():
        w_c4, wsum = prepare(layer)
        return torch.ops.tgpq.qconv2d(x, w_c4, wsum, layer.w_scale, layer.a_scale, layer.group_index, layer.bias,
                                      *_conv_args(layer), _isa_id(), row_bias, residual)

    def theirs():
        return _onednn_conv(layer, quantize_nhwc(layer, x), row_bias, residual, ours).to(x.dtype)

    return theirs() if _choose(layer, tuple(x.shape), ours, theirs) == "onednn" else ours()


def _onednn_conv(layer, xq, row_bias, residual, fallback) -> torch.Tensor:
    """oneDNN's conv over u8 NHWC ``xq``, then the optional adds of the conv ops' contract (same order)."""
    if not _onednn_ok(xq):
        return fallback()
    y = onednn.conv2d_u8(layer, _onednn_packed(layer), xq, _group_scale(layer))  # a fresh tensor: added to in place
    if row_bias is not None:
        y.add_(row_bias[:, :, None, None].to(torch.float32))
    if residual is not None:
        y.add_(residual.to(torch.float32))
    return y


def quantize_nhwc(layer, x: torch.Tensor, pad: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``x`` [B, C, H, W] -> uint8 ``[B, H, W, C]`` (x_q + 128) with ``layer``'s current activation scale.
    ``pad`` ``(left, right, top, bottom)`` as ``F.pad``'s zero padding, written as code 128 (exactly 0) around the
    quantized values: ``[B, H + top + bottom, W + left + right, C]``, with no padded float copy."""
    _check_input(x)
    if pad is not None and (len(pad) != 4 or min(pad) < 0):
        raise ValueError(f"quantize_nhwc: pad must be 4 non-negative sizes (left, right, top, bottom), got {pad}")
    return torch.ops.tgpq.quantize_nhwc_u8(x, layer.a_scale, layer.group_index, _isa_id(), list(pad or ()))


def conv2d_u8(layer, xq: torch.Tensor, row_bias: torch.Tensor | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """Conv over an already quantized uint8 NHWC input ``[B, H, W, Cin]`` (produced with this layer's
    activation scale, e.g. by ``groupnorm_silu_quantize``) -> float32 channels_last ``[B, N, Ho, Wo]``;
    ``row_bias`` / ``residual`` as in ``conv2d``."""
    if xq.dtype != torch.uint8 or xq.dim() != 4:
        raise TypeError(f"conv2d_u8 expects a uint8 [B, H, W, C] tensor, got {xq.dtype} {tuple(xq.shape)}")
    if xq.shape[3] != layer.in_channels:
        raise ValueError(f"qconv2d: input has {xq.shape[3]} channels, the layer expects {layer.in_channels}")
    xq = xq.contiguous()

    def ours():
        w_c4, wsum = prepare(layer)
        return torch.ops.tgpq.qconv2d_u8(xq, w_c4, wsum, layer.w_scale, layer.a_scale, layer.group_index,
                                         layer.bias, *_conv_args(layer), _isa_id(), row_bias, residual)

    def theirs():
        return _onednn_conv(layer, xq, row_bias, residual, ours)

    return theirs() if _choose(layer, ("u8",) + tuple(xq.shape), ours, theirs) == "onednn" else ours()


def linear_u8(layer, xq: torch.Tensor) -> torch.Tensor:
    """Linear over an already quantized uint8 input ``[M, in_features]`` (``x_q + 128`` with this layer's
    activation scale, e.g. a ``groupnorm_silu_quantize`` output viewed as rows) -> float32 ``[M, out_features]``.
    The microkernels run it as a 1x1 convolution over M pixels (the same int32 sums and epilogue as ``linear``)."""
    if xq.dtype != torch.uint8 or xq.dim() != 2 or xq.shape[1] != layer.in_features:
        raise TypeError(f"linear_u8 expects a uint8 [M, {layer.in_features}] tensor, got {xq.dtype} {tuple(xq.shape)}")
    xq = xq.contiguous()
    m, n = xq.shape[0], layer.out_features_

    def ours():
        w_c4, wsum = prepare(layer)
        y = torch.ops.tgpq.qconv2d_u8(xq.reshape(1, m, 1, layer.in_features), w_c4, wsum, layer.w_scale, layer.a_scale,
                                      layer.group_index, layer.bias, layer.bits, n, layer.in_features, [1, 1], [1, 1],
                                      [0, 0], [1, 1], _isa_id(), None, None)
        return y.permute(0, 2, 3, 1).reshape(m, n)  # channels_last [1, n, m, 1]: the rows as they are

    def theirs():
        return _onednn_linear_u8(layer, xq, ours)

    return theirs() if _choose(layer, ("u8",) + tuple(xq.shape), ours, theirs) == "onednn" else ours()


def groupnorm_silu_quantize(norm: torch.nn.GroupNorm, x: torch.Tensor, layer, silu: bool = True,
                            row_bias: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm (+ SiLU) + quantization with ``layer``'s activation scale, one pass -> uint8 NHWC. ``row_bias``
    ``[B, C]`` (optional) is added to ``x`` first without writing the sum (a conv's time-embedding add)."""
    _check_input(x)
    if not isinstance(norm, torch.nn.GroupNorm):
        raise TypeError(f"expected an nn.GroupNorm, got {type(norm).__name__}")
    return torch.ops.tgpq.groupnorm_silu_quantize(x, norm.num_groups, norm.weight, norm.bias, float(norm.eps),
                                                  silu, layer.a_scale, layer.group_index, _isa_id(), row_bias)


def _norm_quantize(norm, xs: list[torch.Tensor], layers: list, silu: bool, row_bias, input_layers=()) -> list:
    """The one call of ``groupnorm_silu_quantize_split``: the normalised outputs, then those of ``input_layers``."""
    for x in xs:
        _check_input(x)
    if not isinstance(norm, torch.nn.GroupNorm):
        raise TypeError(f"expected an nn.GroupNorm, got {type(norm).__name__}")
    return torch.ops.tgpq.groupnorm_silu_quantize_split(
        list(xs), norm.num_groups, norm.weight, norm.bias, float(norm.eps), silu, [m.a_scale for m in layers],
        [m.group_index for m in layers], _isa_id(), row_bias, [m.a_scale for m in input_layers],
        [m.group_index for m in input_layers])


def groupnorm_silu_quantize_split(norm: torch.nn.GroupNorm, xs: list[torch.Tensor], layers: list,
                                  silu: bool = True, row_bias: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``groupnorm_silu_quantize`` of ``cat(xs, dim=1)`` without building the concatenation. With one layer per
    part, part ``i`` is quantized with ``layers[i]``'s activation scale into its own uint8 NHWC ``[B, H, W, C_i]``
    (the inputs of a split conv's parts); with a single layer, every part with its scale into one
    ``[B, H, W, sum C_i]`` (a plain conv's input). Channel slices of a channels_last tensor are read in place;
    ``row_bias`` as in ``groupnorm_silu_quantize`` (over the concatenation's channels)."""
    return _norm_quantize(norm, xs, layers, silu, row_bias)


def groupnorm_silu_quantize_and_input(norm: torch.nn.GroupNorm, xs: list[torch.Tensor], layers: list,
                                      input_layers: list, silu: bool = True) -> tuple[list, list]:
    """``groupnorm_silu_quantize_split(norm, xs, layers)`` and, from the same read of ``xs``, their plain
    quantization with ``input_layers``' scales (one per part, or one layer: one tensor of the concatenation),
    as ``quantize_nhwc`` would write it (of each part, or of the concatenation): ``(normalised outputs, input
    outputs)``."""
    out = _norm_quantize(norm, xs, layers, silu, None, input_layers)
    n = 1 if len(layers) == 1 else len(xs)
    return out[:n], out[n:]
