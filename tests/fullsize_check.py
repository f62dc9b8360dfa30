"""Full-size SD-1.5 / SDXL UNets (published configs, random weights) on the CPU: convert, one forward, save / load.

Run as ``python tests/fullsize_check.py {sd15,sdxl} FOLDER``; prints one JSON line with timings, the peak
resident memory of this process and the checks' numbers (``tests/test_fullsize.py`` runs it in a subprocess so
the peak is this work's alone and the test process keeps no 10 GB heap).

The float model is built with random weights in ``dtype`` (SDXL: bfloat16, 5.1 GB instead of 10.3 GB, so the
peak stays far under the 24 GiB CI machine), calibrated round-to-nearest on one forward at a small latent
(``tgpq.calibration.rtn``: abs-max weight scales, one timestep group), converted in place, run once, written
with ``tgpq.save_pretrained`` and read back with ``tgpq.from_pretrained``; the reloaded model must compute the
very same output.
"""
from __future__ import annotations

import gc
import json
import resource
import sys
import time

import torch

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
#: stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2,567,463,684 parameters)
SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
MODELS = {
    # name: (config, parameters, dtype, latent side, text length, text width)
    "sd15": (SD15, 859_520_964, torch.float32, 16, 77, 768),
    "sdxl": (SDXL, 2_567_463_684, torch.bfloat16, 16, 77, 2048),
}


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB -> GiB


def inputs(name: str, dtype):
    _, _, _, side, length, width = MODELS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, side, side, generator=g).to(dtype)
    kw = {"encoder_hidden_states": torch.randn(1, length, width, generator=g).to(dtype)}
    if name == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280, generator=g).to(dtype),
                                   "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).to(dtype)}
    return x, kw


def main(name: str, folder: str) -> dict:
    from diffusers import UNet2DConditionModel

    import tgpq
    from tgpq.calibration.rtn import rtn_quant_state

    config, params, dtype, *_ = MODELS[name]
    torch.manual_seed(0)
    rec, t0 = {"model": name, "dtype": str(dtype).replace("torch.", "")}, time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random init straight in the model's dtype: no float32 copy
    try:
        unet = UNet2DConditionModel(**config).eval()
    finally:
        torch.set_default_dtype(default)
    rec["params"] = sum(p.numel() for p in unet.parameters())
    assert rec["params"] == params, rec["params"]
    rec["build_s"] = time.perf_counter() - t0
    x, kw = inputs(name, dtype)
    cfg = tgpq.QuantConfig(weight_bits=8, method="rtn", num_groups=1)
    t = time.perf_counter()
    with torch.no_grad():
        ref = unet(x, 500, **kw).sample.float()
        qstate = rtn_quant_state(unet, cfg, lambda k, ts: (x, kw), timesteps=[500], weight_scale="absmax")
    rec["float_forward_and_rtn_s"] = time.perf_counter() - t
    float_bytes = tgpq.weight_bytes(unet)
    t = time.perf_counter()
    qunet = tgpq.convert(unet, qstate, inplace=True)  # the float layers are freed as they are replaced
    del qstate, unet
    gc.collect()
    rec["convert_s"] = time.perf_counter() - t
    rec["quantized_layers"] = len(tgpq.quantized_layers(qunet))
    rec["size_ratio"] = tgpq.weight_bytes(qunet) / float_bytes
    t = time.perf_counter()
    with torch.no_grad():
        out = qunet(x, 500, **kw).sample
    rec["quantized_forward_s"] = time.perf_counter() - t
    assert out.shape == x.shape and out.dtype == dtype and bool(torch.isfinite(out).all())
    rec["rel_mse_vs_float"] = float((out.float() - ref).pow(2).mean() / ref.pow(2).mean())
    t = time.perf_counter()
    tgpq.save_pretrained(qunet, folder)
    rec["save_s"] = time.perf_counter() - t
    del qunet
    gc.collect()
    t = time.perf_counter()
    loaded = tgpq.from_pretrained(folder)
    rec["load_s"] = time.perf_counter() - t
    with torch.no_grad():
        again = loaded(x, 500, **kw).sample
    rec["reload_equal"] = bool(torch.equal(again, out))
    rec["total_s"] = time.perf_counter() - t0
    rec["peak_rss_gib"] = peak_gb()
    return rec


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
