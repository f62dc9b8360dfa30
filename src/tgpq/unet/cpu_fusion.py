"""CPU fusions for a converted diffusers UNet: fewer passes over activations outside the int8 GEMMs.

``fuse_for_cpu(qunet)`` patches, in place, the modules of a model returned by ``tgpq.convert``:

* ``ResnetBlock2D`` (no up/down-sampling inside the block): ``norm1 -> SiLU -> conv1`` and
  ``norm2 -> SiLU -> conv2`` each become one fused pass (GroupNorm statistics, normalise, SiLU,
  quantize with the conv's activation scale, write uint8 NHWC: ``groupnorm_silu_quantize``)
  followed by the implicit-GEMM conv over that uint8 tensor (``qconv2d_u8``). Activations stay
  channels_last from block to block. Where conv1 is a split conv (a decoder block's concatenated skip
  input), ``norm1`` runs over the concatenation's parts (``groupnorm_silu_quantize_split``: one uint8
  tensor per conv part), and ``cpu_skips`` lets the decoder block hand over the two halves without
  building the concatenation at all. The time-embedding add is folded into norm2 (it shifts the
  statistics' pilot values and the affine offset; the sum is never written), the second branch of a
  split conv and the residual add (into conv2) are done on each GEMM output block while it is in cache
  instead of as separate passes.
* ``Attention`` (self-attention, no mask): when ``to_q``, ``to_k``, ``to_v`` are ``QLinear`` layers with
  identical activation-scale tables (they read the same tensor), they are merged into one
  ``QLinear`` with ``3 * inner_dim`` outputs: the input is quantized once and one GEMM runs; the
  block's GroupNorm and that quantization are one pass (``groupnorm_silu_quantize`` without SiLU). The
  merged layer is derived from the three and rebuilt when their tensors change (it is not state).
  The attention itself stays float32 ``scaled_dot_product_attention`` (no error added).
* ``Downsample2D`` with ``padding=0`` (a conv after ``F.pad(x, (0, 1, 0, 1))``, the DDPM layout): the
  quantization writes the zero border itself (code 128) and the conv reads that uint8 tensor, so the padded
  float copy is never made.

Numerics: the fused GroupNorm + SiLU differs from torch's by a few float32 ulps (see
``csrc/torch/norm_ops.cpp``), so a quantized activation moves by one step only where it lies within
~1e-6 of a rounding boundary. The fused adds are the same float32 adds; the time embedding enters norm2
exactly (the module rounds ``conv1 + temb`` to float32 first: ulps).

The patched forwards fall back to the original code when the layer's backend does not resolve to the
cpu backend for the input (a CUDA tensor, ``set_backend(model, "reference")``), when grad is enabled,
or for dtypes other than float32 / bfloat16 / float16 (computed in float32, returned in the model's dtype). ``unfuse_for_cpu(model)`` restores the original forwards
and attention processors.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..backends import cpu as cpu_backend
from ..nn import QConv2d, QLinear, QSplitConv2d


def _cpu_path(layer, x: torch.Tensor) -> bool:
    """The fused path runs where the layer's backend resolves to the cpu backend (the one that has the
    uint8-NHWC ops), without autograd, on the dtypes its ops take."""
    return (not torch.is_grad_enabled() and x.dtype in cpu_backend.FLOAT_DTYPES
            and backends.resolve(layer.backend, x) is cpu_backend)


def _is_silu(mod) -> bool:
    return isinstance(mod, nn.SiLU) or getattr(mod, "__name__", "") == "silu" or mod is F.silu


def _fusable_norm_conv(norm, conv) -> bool:
    return isinstance(norm, nn.GroupNorm) and isinstance(conv, QConv2d)


def _conv(conv: nn.Module, x: torch.Tensor, row_bias: torch.Tensor | None = None,
          residual: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x) (+ row_bias[:, :, None, None]) (+ residual)``; on a quantized conv the adds happen in the
    GEMM's output block while it is in cache (a split conv adds its second branch the same way)."""
    if isinstance(conv, QConv2d):
        return cpu_backend.conv2d(conv, x, row_bias, residual)
    if isinstance(conv, QSplitConv2d):
        chunks = torch.split(x, list(conv.in_splits), dim=1)
        out = cpu_backend.conv2d(conv.parts[0], chunks[0], row_bias)
        for part, chunk in zip(conv.parts[1:], chunks[1:]):
            out = cpu_backend.conv2d(part, chunk, None, out)
        return out if residual is None else out + residual
    out = conv(x)
    if row_bias is not None:
        out = out + row_bias[:, :, None, None]
    return out if residual is None else out + residual


def _joined(xs: list[torch.Tensor]) -> torch.Tensor:
    """The block input the parts ``xs`` stand for (concatenated only where a path needs it whole)."""
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)


def _shortcut_input_layers(conv: nn.Module | None, xs: list[torch.Tensor]) -> list | None:
    """The layers whose activation scales quantize a 1x1 shortcut's input ``xs`` (the conv, or its parts when
    they match the parts of ``xs``), or None when the shortcut does not read uint8 input."""
    if isinstance(conv, QConv2d):
        return [conv]
    if isinstance(conv, QSplitConv2d) and len(xs) > 1 and [x.shape[1] for x in xs] == list(conv.in_splits):
        return list(conv.parts)
    return None


def _conv_u8_parts(parts, us: list[torch.Tensor], row_bias: torch.Tensor | None) -> torch.Tensor:
    """A split conv over its parts' uint8 NHWC inputs: ``(part0 + row_bias) + part1 + ...``."""
    out = cpu_backend.conv2d_u8(parts[0], us[0], row_bias)
    for part, u in zip(parts[1:], us[1:]):
        out = cpu_backend.conv2d_u8(part, u, None, out)
    return out


def _resnet_forward_cpu(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not _cpu_path(self.conv2, input_tensor):
        return self._tgpq_orig_forward(input_tensor, temb, *args, **kwargs)
    xs = list(torch.split(input_tensor, list(self.conv1.in_splits), dim=1)) if self._tgpq_split1 else [input_tensor]
    return _resnet_parts(self, xs, temb)


def resnet_forward_parts(block: nn.Module, xs: list[torch.Tensor], temb: torch.Tensor | None) -> torch.Tensor:
    """``block(cat(xs, dim=1), temb)`` without the concatenation (a skip connection's two halves) where the
    fused path runs (norm1 fused into a plain conv1, or into a split conv1 whose split ``xs`` match); else the
    block's own call on the ``cat``."""
    split_ok = getattr(block, "_tgpq_fuse1", False) or (
        getattr(block, "_tgpq_split1", False) and [x.shape[1] for x in xs] == list(block.conv1.in_splits))
    if (split_ok and not (block._forward_hooks or block._forward_pre_hooks)
            and all(_cpu_path(block.conv2, x) and x.dtype == xs[0].dtype for x in xs)):
        return _resnet_parts(block, xs, temb)
    return block(torch.cat(xs, dim=1), temb)


def _resnet_parts(self, xs: list[torch.Tensor], temb: torch.Tensor | None) -> torch.Tensor:
    """The fused ResnetBlock2D on the channel parts ``xs`` of its input (one part, or the two halves that a
    split conv1 reads)."""
    t = None
    if self.time_emb_proj is not None and temb is not None:
        t = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))
    # conv1's time-embedding add is folded into norm2 (its statistics and affine offset), never written out;
    # a quantized 1x1 shortcut gets its uint8 input from norm1's read of the same tensor
    sc, vs = self.conv_shortcut, None
    sc_layers = _shortcut_input_layers(sc, xs)
    if self._tgpq_split1 or self._tgpq_fuse1:
        layers = list(self.conv1.parts) if self._tgpq_split1 else [self.conv1]
        if sc_layers:
            us, vs = cpu_backend.groupnorm_silu_quantize_and_input(self.norm1, xs, layers, sc_layers)
        else:
            us = cpu_backend.groupnorm_silu_quantize_split(self.norm1, xs, layers)
        h = _conv_u8_parts(layers, us, None)
    else:
        h = _conv(self.conv1, self.nonlinearity(self.norm1(_joined(xs))))
    if vs is not None:
        x = _conv_u8_parts(sc_layers, vs, None)
    elif sc is not None:
        x = _conv(sc, _joined(xs))
    else:
        x = _joined(xs)
    u = cpu_backend.groupnorm_silu_quantize(self.norm2, h, self.conv2, row_bias=t)
    out = cpu_backend.conv2d_u8(self.conv2, u, residual=x)
    if self.output_scale_factor != 1.0:
        out = out / self.output_scale_factor
    return out.to(xs[0].dtype)  # the GEMMs write float32; a float16 / bfloat16 model keeps its dtype


def fuse_resnet_block(block: nn.Module) -> bool:
    """Patch one diffusers ``ResnetBlock2D``; returns whether it was patched."""
    if getattr(block, "_tgpq_orig_forward", None) is not None:
        return True
    ok = (block.upsample is None and block.downsample is None and block.time_embedding_norm == "default"
          and _is_silu(block.nonlinearity) and _fusable_norm_conv(block.norm2, block.conv2)
          and isinstance(block.norm1, nn.GroupNorm))
    if not ok:
        return False
    block._tgpq_fuse1 = _fusable_norm_conv(block.norm1, block.conv1)
    block._tgpq_split1 = isinstance(block.conv1, QSplitConv2d) and all(isinstance(p, QConv2d) for p in block.conv1.parts)
    block._tgpq_orig_forward = block.forward
    block.forward = types.MethodType(_resnet_forward_cpu, block)
    block._tgpq_forward_parts = types.MethodType(resnet_forward_parts, block)  # called by cpu_skips
    return True


def _merge_qkv(attn: nn.Module) -> QLinear | None:
    """One ``QLinear`` computing ``[to_q, to_k, to_v]`` of ``attn`` from their current weights, or None
    when they cannot be merged (not all quantized, other shapes, other activation scale tables)."""
    q, k, v = attn.to_q, attn.to_k, attn.to_v
    if not all(isinstance(m, QLinear) for m in (q, k, v)):
        return None
    if not (q.bits == k.bits == v.bits and q.in_features == k.in_features == v.in_features):
        return None
    if not (torch.equal(q.a_scale, k.a_scale) and torch.equal(q.a_scale, v.a_scale)):
        return None
    has_bias = [m.bias is not None for m in (q, k, v)]
    n = q.out_features + k.out_features + v.out_features
    fused = QLinear(q.in_features, n, q.bits, q.a_scale.numel(), bias=any(has_bias))
    with torch.no_grad():
        fused.w_packed.copy_(torch.cat([q.w_packed, k.w_packed, v.w_packed]))
        fused.w_scale.copy_(torch.cat([q.w_scale, k.w_scale, v.w_scale]))
        fused.a_scale.copy_(q.a_scale)
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features)
                                        for m in (q, k, v)]))
    fused.backend = "cpu"
    if q._router is not None:
        fused.attach_router(q._router)
    return fused.to(q.w_packed.device)


def _qkv_key(attn: nn.Module) -> tuple:
    """Identity of the current q/k/v state: any in-place change (load_state_dict) or new tensor changes it."""
    tensors = [t for m in (attn.to_q, attn.to_k, attn.to_v)
               for t in (m.w_packed, m.w_scale, m.a_scale, m.bias) if t is not None]
    return cpu_backend.state_key(*tensors)


class CpuAttnProcessor:
    """Self-attention with one merged int8 qkv GEMM, float32 SDPA, int8 output projection.

    The merged layer is derived from ``to_q`` / ``to_k`` / ``to_v`` and rebuilt whenever their tensors
    change (``load_state_dict``, ``.to()``); it is not part of the state dict. The fused path runs only
    where ``to_q``'s backend resolves to the cpu backend (``set_backend`` switches it off)."""

    def __init__(self, original, attn):
        self.original = original
        self._qkv, self._key = _merge_qkv(attn), _qkv_key(attn)
        if self._qkv is not None:
            cpu_backend.prepare(self._qkv)

    def merged_qkv(self, attn) -> QLinear | None:
        if torch.compiler.is_compiling():  # traced as built (recompile after changing the weights)
            return self._qkv
        key = _qkv_key(attn)
        if key != self._key:
            self._qkv, self._key = _merge_qkv(attn), key
        return self._qkv

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        qkv_layer = None
        if (encoder_hidden_states is None and attention_mask is None and attn.spatial_norm is None
                and hidden_states.dim() == 4 and isinstance(attn.to_q, QLinear) and _cpu_path(attn.to_q, hidden_states)):
            qkv_layer = self.merged_qkv(attn)
        if qkv_layer is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        if isinstance(attn.group_norm, nn.GroupNorm):  # GroupNorm + quantize in one pass, uint8 rows to the GEMM
            xq = cpu_backend.groupnorm_silu_quantize(attn.group_norm, hidden_states, qkv_layer, silu=False)
            qkv = cpu_backend.linear_u8(qkv_layer, xq.reshape(b * h * w, c)).reshape(b, h * w, -1).to(residual.dtype)
        else:
            x = hidden_states if attn.group_norm is None else attn.group_norm(hidden_states)
            qkv = qkv_layer(x.permute(0, 2, 3, 1).reshape(b, h * w, c))  # free for channels_last input
        inner = qkv.shape[-1] // 3
        head_dim = inner // attn.heads
        q, k, v = (t.reshape(b, h * w, attn.heads, head_dim).transpose(1, 2) for t in qkv.split(inner, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        o = o.transpose(1, 2).reshape(b, h * w, inner)
        o = attn.to_out[1](attn.to_out[0](o))
        out = o.reshape(b, h, w, c).permute(0, 3, 1, 2)  # channels_last view
        if attn.residual_connection:
            out = out + residual
        return out if attn.rescale_output_factor == 1.0 else out / attn.rescale_output_factor


def fuse_attention(attn: nn.Module) -> bool:
    """Install ``CpuAttnProcessor`` on one diffusers ``Attention``; returns whether it was patched."""
    if isinstance(getattr(attn, "processor", None), CpuAttnProcessor):
        return True
    if getattr(attn, "is_cross_attention", False) or not hasattr(attn, "to_q"):
        return False
    proc = CpuAttnProcessor(attn.processor, attn)
    if proc.merged_qkv(attn) is None:
        return False
    # The merged layer lives in the processor only (not a submodule): the model's state_dict, and so
    # tgpq.save / tgpq.load, stay exactly those of the unfused model.
    attn.set_processor(proc)
    return True


def _downsample_forward_cpu(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not _cpu_path(self.conv, hidden_states) or hidden_states.dim() != 4:
        return self._tgpq_orig_forward(hidden_states, *args, **kwargs)
    xq = cpu_backend.quantize_nhwc(self.conv, hidden_states, pad=(0, 1, 0, 1))  # F.pad's (0, 1, 0, 1)
    return cpu_backend.conv2d_u8(self.conv, xq).to(hidden_states.dtype)


def fuse_downsample(mod: nn.Module) -> bool:
    """Patch one diffusers ``Downsample2D`` whose conv follows ``F.pad(x, (0, 1, 0, 1))`` (``padding=0``,
    no norm, a ``QConv2d``); returns whether it was patched."""
    if getattr(mod, "_tgpq_orig_forward", None) is not None:
        return True
    if not (getattr(mod, "use_conv", False) and mod.padding == 0 and mod.norm is None
            and isinstance(mod.conv, QConv2d)):
        return False
    mod._tgpq_orig_forward = mod.forward
    mod.forward = types.MethodType(_downsample_forward_cpu, mod)
    return True


def fuse_for_cpu(model: nn.Module) -> dict[str, int]:
    """Patch every fusable ResnetBlock2D, Attention and decoder block (cat-free skips, ``cpu_skips``) of a
    converted model, in place.

    Call after ``tgpq.convert`` / ``tgpq.load`` (the model keeps its call signature). Returns counts
    ``{"resnet_blocks": n, "attention": m, "downsamplers": d, "up_blocks": k}``. Idempotent.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D

    from .cpu_skips import fuse_up_block

    counts = {"resnet_blocks": 0, "attention": 0, "downsamplers": 0, "up_blocks": 0}
    for mod in model.modules():
        if isinstance(mod, ResnetBlock2D) and fuse_resnet_block(mod):
            counts["resnet_blocks"] += 1
        elif isinstance(mod, Attention) and fuse_attention(mod):
            counts["attention"] += 1
        elif isinstance(mod, Downsample2D) and fuse_downsample(mod):
            counts["downsamplers"] += 1
    for mod in model.modules():  # after the resnets: a decoder block is patched when all of its resnets are
        if fuse_up_block(mod):
            counts["up_blocks"] += 1
    merged = {id(getattr(mod, n)) for mod in model.modules()  # served by their attention's merged qkv layer
              if isinstance(getattr(mod, "processor", None), CpuAttnProcessor) and mod.processor._qkv is not None
              for n in ("to_q", "to_k", "to_v")}
    for m in model.modules():  # repack every weight for the microkernels now, not on the first call
        if isinstance(m, (QLinear, QConv2d)) and id(m) not in merged:
            cpu_backend.prepare(m)
    return counts


def unfuse_for_cpu(model: nn.Module) -> None:
    """Undo ``fuse_for_cpu``'s forward patches."""
    from .cpu_skips import unfuse_up_block

    for mod in model.modules():
        unfuse_up_block(mod)
        if getattr(mod, "_tgpq_orig_forward", None) is not None:
            mod.forward = mod._tgpq_orig_forward
            for name in ("_tgpq_orig_forward", "_tgpq_fuse1", "_tgpq_split1", "_tgpq_forward_parts"):
                mod.__dict__.pop(name, None)
        proc = getattr(mod, "processor", None)
        if isinstance(proc, CpuAttnProcessor):
            mod.set_processor(proc.original)
