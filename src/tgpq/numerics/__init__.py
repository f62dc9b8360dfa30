"""Quantization numerics: pure functions, no module state, one copy of each.

Contracts shared by every backend (reference, cpu, triton) and kernel:

* weights (``weights``): symmetric per output channel, ``w_q = clamp(rne(w / w_scale[n]), -qmax, qmax)``;
* activations (``activations``): symmetric int8, ``x_q = clamp(rne(float32(x) * (1 / a_scale[g])), -127, 127)``;
* a quantized linear layer computes ``y[m, n] = float32(sum_k x_q[m, k] * w_q[n, k]) *
  (a_scale[g] * w_scale[n]) + bias[n]`` with exact int32 accumulation.
"""
from .activations import ACT_QMAX, act_scale_from_range, fake_quant_act, quantize_act, round_ste
from .weights import absmax_weight_scale, dequantize_weight, mse_weight_scale, qmax, quantize_weight

__all__ = ["ACT_QMAX", "act_scale_from_range", "fake_quant_act", "quantize_act", "round_ste",
           "absmax_weight_scale", "dequantize_weight", "mse_weight_scale", "qmax", "quantize_weight"]
