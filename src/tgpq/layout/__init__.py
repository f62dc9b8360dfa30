"""Packed weight layouts: ``PackedWeight`` owns a quantized layer's weight bytes (canonical int8 /
int4 form), ``int4`` packs and unpacks, ``conv_output_size`` is the implicit-GEMM conv geometry."""
from .int4 import pack_int4, pack_weight, unpack_int4, unpack_weight
from .packed_weight import PackedWeight, conv_output_size, cpu_prepacked_shape

__all__ = ["PackedWeight", "conv_output_size", "cpu_prepacked_shape", "pack_int4", "pack_weight", "unpack_int4",
           "unpack_weight"]
