"""convert / routing / save / load on a small DDPM-layout UNet built from a config."""
import json
import struct

import pytest
import torch
from conftest import make_small_unet, minmax_qstate, small_unet_config

import tgpq
from tgpq.backends import library as ops
from tgpq.nn import QConv2d, QLinear

BACKENDS = ["reference"] + (["cpu"] if ops.has_extension() else [])


@pytest.fixture(scope="module")
def unet_and_qstate():
    unet = make_small_unet()
    cfg = tgpq.QuantConfig(weight_bits=8, method="rtn", num_groups=5)
    return unet, minmax_qstate(unet, cfg)


def test_convert_swaps_layers_keeps_excluded(unet_and_qstate):
    unet, qs = unet_and_qstate
    q = tgpq.convert(unet, qs)
    assert type(q) is type(unet)
    assert isinstance(unet.down_blocks[0].resnets[0].conv1, torch.nn.Conv2d)  # original untouched
    assert isinstance(q.down_blocks[0].resnets[0].conv1, QConv2d)
    assert isinstance(q.down_blocks[1].attentions[0].to_q, QLinear)
    for name in ("conv_in", "conv_out"):
        assert type(q.get_submodule(name)) is torch.nn.Conv2d
    assert type(q.time_embedding.linear_1) is torch.nn.Linear
    assert set(tgpq.quantized_layers(q)) == set(qs.layers)
    assert tgpq.weight_bytes(q) < 0.5 * tgpq.weight_bytes(unet)


@pytest.mark.parametrize("backend", BACKENDS)
def test_converted_output_close_to_float(unet_and_qstate, backend):
    unet, qs = unet_and_qstate
    q = tgpq.convert(unet, qs, backend=backend)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        for t in (900, 50):
            ref = unet(x, t).sample
            out = q(x, t)
            assert type(out).__name__ == "UNet2DOutput"
            err = (out.sample - ref).pow(2).mean() / ref.pow(2).mean()
            assert err < 5e-3, float(err)  # W8A8 on a random UNet: small but nonzero error
            assert err > 0


def test_backends_agree_on_the_unet(unet_and_qstate):
    if not ops.has_extension():
        pytest.skip("tgpq._C not built")
    unet, qs = unet_and_qstate
    ref = tgpq.convert(unet, qs, backend="reference")
    cpu = tgpq.convert(unet, qs, backend="cpu")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = ref(x, 500).sample, cpu(x, 500).sample
    # identical integer math; float32 rounding can flip a rare activation rounding in a later layer
    assert (a - b).abs().max() <= 1e-3 * a.abs().max()


def test_timestep_routing(unet_and_qstate):
    unet, qs = unet_and_qstate
    q = tgpq.convert(unet, qs, backend="reference")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        q(x, 999)
        assert int(q.tgpq_router.group_index) == 4
        q(x, torch.tensor([10, 10]).float()[:1])
        assert int(q.tgpq_router.group_index) == 0
        q(torch.randn(2, 3, 16, 16), timestep=torch.tensor([450, 450]))
        assert int(q.tgpq_router.group_index) == 2
        # all layers share the router's tensor
        layer = q.down_blocks[0].resnets[0].conv1
        assert layer.group_index.data_ptr() == q.tgpq_router.group_index.data_ptr()
        with pytest.raises(ValueError, match="mixes timesteps"):
            q(torch.randn(2, 3, 16, 16), torch.tensor([10, 900]))
        # different groups give different outputs
        assert not torch.allclose(q(x, 999).sample, q(x, 10).sample)


def test_ddim_pipeline_runs_end_to_end(unet_and_qstate):
    from diffusers import DDIMPipeline, DDIMScheduler

    unet, qs = unet_and_qstate
    q = tgpq.convert(unet, qs)
    pipe = DDIMPipeline(unet=q, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np")
    img = out.images
    assert img.shape == (2, 16, 16, 3)
    assert (img >= 0).all() and (img <= 1).all()


def test_convert_rejects_bad_qstate(unet_and_qstate):
    unet, qs = unet_and_qstate
    import copy

    bad = copy.deepcopy(qs)
    bad.layers["no.such.layer"] = next(iter(bad.layers.values()))
    with pytest.raises(ValueError, match="no layer named"):
        tgpq.convert(unet, bad)
    bad = copy.deepcopy(qs)
    name = "down_blocks.0.resnets.0.conv1"
    lq = bad.layers[name]
    lq.act_scale = lq.act_scale[:3]
    with pytest.raises(ValueError, match="groups"):
        tgpq.convert(unet, bad)
    with pytest.raises(TypeError):
        tgpq.convert(unet, {"layers": {}})
    q = tgpq.convert(unet, qs)
    with pytest.raises(ValueError, match="already converted"):
        tgpq.convert(q, qs)


def test_save_load_roundtrip(unet_and_qstate, tmp_path):
    unet, qs = unet_and_qstate
    q = tgpq.convert(unet, qs, backend="reference")
    path = tmp_path / "q.safetensors"
    tgpq.save(q, path)
    r = tgpq.load(path, backend="reference")
    r2 = tgpq.load(path, unet_config=small_unet_config(), backend="reference")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        a = q(x, 300).sample
        assert torch.equal(a, r(x, 300).sample)
        assert torch.equal(a, r2(x, 300).sample)
    for k, v in q.state_dict().items():
        assert torch.equal(v, r.state_dict()[k]), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_save_load_keeps_a_half_precision_unet_in_its_dtype(unet_and_qstate, tmp_path, dtype):
    """The float layers of a bf16 / fp16 UNet load in the file's dtype (not the config's float32), so the loaded
    model runs and computes what the saved one did."""
    import copy

    unet, qs = unet_and_qstate
    q = tgpq.convert(copy.deepcopy(unet).to(dtype), qs, backend="reference")
    path = tmp_path / "q.safetensors"
    tgpq.save(q, path)
    r = tgpq.load(path, backend="reference")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9)).to(dtype)
    with torch.no_grad():
        a = q(x, 300).sample
        assert a.dtype == dtype and torch.equal(a, r(x, 300).sample)
    for k, v in q.state_dict().items():
        assert v.dtype == r.state_dict()[k].dtype and torch.equal(v, r.state_dict()[k]), k


def _tamper(path, offset_from_end=10):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_load_rejects_bad_files(unet_and_qstate, tmp_path):
    unet, qs = unet_and_qstate
    q = tgpq.convert(unet, qs)
    path = tmp_path / "q.safetensors"
    tgpq.save(q, path)
    raw = path.read_bytes()
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        tgpq.load(tmp_path / "missing.safetensors")
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        tgpq.load(trunc)
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(raw)
    _tamper(tampered)
    with pytest.raises(ValueError, match="checksum"):
        tgpq.load(tampered)
    # header metadata edited: format name changed
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"]["tgpq"] = header["__metadata__"]["tgpq"].replace("tgpq-quantized-unet", "tgpq-quantized-xxxx")
    hb = json.dumps(header).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    bad = tmp_path / "header.safetensors"
    bad.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
    with pytest.raises(ValueError, match="unsupported format"):
        tgpq.load(bad)
    with pytest.raises(ValueError, match="does not match|does not exist"):
        tgpq.load(path, unet_config=small_unet_config(block_out_channels=(16, 32, 64)))
    with pytest.raises(ValueError, match="converted"):
        tgpq.save(unet, tmp_path / "float.safetensors")
