"""tgpq Triton kernels (installed as ``tgpq.kernels``): fused W8A8 / W4A8 GEMM and conv2d.

Self-contained: knows nothing of tgpq modules or diffusers. Public launchers:

* ``qlinear(x, w_packed, w_scale, a_scale, group_index, bias=None, *, bits, k)``
* ``qconv2d(x, w_packed, w_scale, a_scale, group_index, bias=None, *, bits, in_channels,
  kernel_size, stride, padding, dilation=(1, 1))``

and ``precompile_qlinear`` / ``precompile_qconv2d`` (same arguments, tensors may be on the meta device,
plus the target's ``capability``): compile what the launcher would launch, without launching.
"""
from .qconv2d import conv_out_size, precompile_qconv2d, qconv2d
from .qgemm import precompile_qlinear, qlinear

__all__ = ["conv_out_size", "precompile_qconv2d", "precompile_qlinear", "qconv2d", "qlinear"]
