"""The CPU benchmark's peers (PT2E int8 + torch.compile, OpenVINO fp32 / int8 / hybrid) and the SD-1.5 UNet
setting (random weights, 64x64 latents, batch 2 as classifier-free guidance runs it, 77-token text)."""
from __future__ import annotations

import torch

#: The published Stable Diffusion 1.5 UNet config (runwayml/stable-diffusion-v1-5, unet/config.json).
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_TEXT = (77, 768)


def pt2e_model(unet, example):
    """PT2E int8: X86InductorQuantizer (torch.mul excluded for the integer timestep) + torch.compile."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    q = X86InductorQuantizer()
    q.set_global(get_default_x86_inductor_quantization_config())
    q.set_function_type_qconfig(torch.mul, None)
    m = torch.export.export(unet, example).module()
    m = prepare_pt2e(m, q)
    with torch.inference_mode():
        for t in (999, 500, 10):
            m(example[0], torch.full_like(example[1], t))
    m = convert_pt2e(m)
    return torch.compile(m)


def openvino_models(unet, example, int8: bool):
    import openvino as ov

    core = ov.Core()
    ovm = ov.convert_model(unet, example_input=example)
    if int8:
        import nncf

        calib = [(torch.randn_like(example[0]), torch.full_like(example[1], t)) for t in (999, 700, 400, 100, 10)]
        ovm = nncf.quantize(ovm, nncf.Dataset(calib, lambda d: (d[0].numpy(), d[1].numpy())),
                            model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    compiled = core.compile_model(ovm, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads()})
    return compiled


def openvino_hybrid(model, example: tuple, calibration: list):
    """OpenVINO int8 the way optimum-intel quantizes Stable Diffusion UNets ("hybrid"): every Conv / MatMul
    with weights gets int8 weights (weight-only, ``nncf.compress_weights``), the remaining operations are
    quantized with activations (``nncf.quantize``, transformer preset, SmoothQuant off) on ``calibration``."""
    import nncf
    import openvino as ov

    core = ov.Core()
    ovm = ov.convert_model(model, example_input=example)
    weighted = [op.get_friendly_name() for op in ovm.get_ops() if op.get_type_name() in ("Convolution", "MatMul")
                and any(i.get_node().get_type_name() in ("Constant", "Convert")
                        for i in (src.get_source_output() for src in op.inputs()))]
    ovm = nncf.compress_weights(ovm, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ovm = nncf.quantize(ovm, nncf.Dataset(calibration, lambda d: tuple(v.numpy() for v in d)),
                        model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
                        ignored_scope=nncf.IgnoredScope(names=weighted, validate=False),
                        advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alpha=-1))
    return core.compile_model(ovm, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads()})
