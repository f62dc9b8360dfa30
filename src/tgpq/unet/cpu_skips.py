"""Cat-free skip connections for the CPU path of a converted diffusers UNet.

A decoder (up) block concatenates its input with a skip tensor before each ResnetBlock2D
(``torch.cat([hidden, skip], dim=1)``), a float pass that writes both again. The fused resnet
(``cpu_fusion``) reads the two halves as they are: GroupNorm + SiLU + quantize over the virtual
concatenation (``groupnorm_silu_quantize_split``) writes conv1's uint8 input (one tensor per part of a
split conv1, calibrated per half; else one tensor, where the concatenation costs a byte per value), and,
from the same read, the 1x1 shortcut's uint8 input (per part or joined). ``fuse_up_block``
patches ``UpBlock2D``, ``AttnUpBlock2D`` and ``CrossAttnUpBlock2D`` so that their loop hands the halves to
the resnet instead of concatenating them; the result is bit for bit what the resnet computes on the
concatenated tensor.

The patched forward runs the block's own loop (resnet, attention, upsamplers, with the block's
arguments as diffusers names them) and falls back to the original forward where the fused path does not
apply: autograd enabled, FreeU enabled, a resnet that is not fused with a split conv1, a tensor the cpu
backend does not take. ``unfuse_up_block`` restores it.
"""
from __future__ import annotations

import inspect
import types

import torch
from torch import nn

UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D")


def _freeu_enabled(block: nn.Module) -> bool:
    return bool(getattr(block, "s1", None) and getattr(block, "s2", None) and getattr(block, "b1", None)
                and getattr(block, "b2", None))


def _attend(block: nn.Module, attn: nn.Module, hidden: torch.Tensor, args: dict) -> torch.Tensor:
    if type(block).__name__ == "CrossAttnUpBlock2D":
        return attn(hidden, encoder_hidden_states=args.get("encoder_hidden_states"),
                    cross_attention_kwargs=args.get("cross_attention_kwargs"),
                    attention_mask=args.get("attention_mask"),
                    encoder_attention_mask=args.get("encoder_attention_mask"), return_dict=False)[0]
    return attn(hidden)


def _upsample(block: nn.Module, up: nn.Module, hidden: torch.Tensor, args: dict) -> torch.Tensor:
    if type(block).__name__ == "AttnUpBlock2D":
        return up(hidden, temb=args.get("temb")) if block.upsample_type == "resnet" else up(hidden)
    return up(hidden, args.get("upsample_size"))


def _up_forward_cpu(self, *args, **kwargs) -> torch.Tensor:
    bound = self._tgpq_up_signature.bind(*args, **kwargs)
    a = bound.arguments
    if (torch.is_grad_enabled() or _freeu_enabled(self) or a.get("args") or a.get("kwargs")
            or (a.get("cross_attention_kwargs") or {}).get("scale") is not None):
        return self._tgpq_orig_up_forward(*args, **kwargs)
    hidden, skips, temb = a["hidden_states"], tuple(a["res_hidden_states_tuple"]), a.get("temb")
    attentions = getattr(self, "attentions", None)
    for i, resnet in enumerate(self.resnets):
        skip, skips = skips[-1], skips[:-1]
        hidden = resnet._tgpq_forward_parts([hidden, skip], temb)  # cpu_fusion.resnet_forward_parts
        if attentions is not None:
            hidden = _attend(self, attentions[i], hidden, a)
    for up in self.upsamplers or ():
        hidden = _upsample(self, up, hidden, a)
    return hidden


def fuse_up_block(block: nn.Module) -> bool:
    """Patch one decoder block whose resnets all take their input halves (``cpu_fusion.fuse_resnet_block``
    with norm1 fused into conv1, split or not); returns whether it was patched."""
    if getattr(block, "_tgpq_orig_up_forward", None) is not None:
        return True
    if type(block).__name__ not in UP_BLOCKS or not all(
            getattr(r, "_tgpq_split1", False) or getattr(r, "_tgpq_fuse1", False) for r in block.resnets):
        return False
    block._tgpq_up_signature = inspect.signature(block.forward)
    block._tgpq_orig_up_forward = block.forward
    block.forward = types.MethodType(_up_forward_cpu, block)
    return True


def unfuse_up_block(block: nn.Module) -> None:
    if getattr(block, "_tgpq_orig_up_forward", None) is not None:
        block.forward = block._tgpq_orig_up_forward
        del block._tgpq_orig_up_forward, block._tgpq_up_signature
