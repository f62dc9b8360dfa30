"""tgpq Triton kernels (installed as ``tgpq.kernels``): fused W8A8 / W4A8 GEMM and conv2d.

Self-contained: knows nothing of tgpq modules or diffusers. Public launchers:

* ``qlinear(x, w_packed, w_scale, a_scale, group_index, bias=None, *, bits, k)``
* ``qconv2d(x, w_packed, w_scale, a_scale, group_index, bias=None, *, bits, in_channels,
  kernel_size, stride, padding, dilation=(1, 1))``
"""
from .qconv2d import conv_out_size, qconv2d
from .qgemm import qlinear

__all__ = ["conv_out_size", "qconv2d", "qlinear"]
