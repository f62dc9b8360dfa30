"""Diffusers-style folders (issue 17): tgpq.save_pretrained / tgpq.from_pretrained for quantized UNets and
pipelines, what is refused in one line, and ``tgpq quantize`` on saved diffusers folders."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_small_unet, minmax_qstate

import tgpq
from tgpq.cli import main
from tiny_pipelines import TEXT_DIM, TEXT_LEN, make_sd_pipeline

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def qunet():
    unet = make_small_unet(seed=5)
    return tgpq.convert(unet, minmax_qstate(unet, tgpq.QuantConfig(weight_bits=8, method="rtn")), backend="reference")


@pytest.fixture(scope="module")
def qpipe(tmp_path_factory):
    pipe = make_sd_pipeline(tmp_path_factory.mktemp("sd"))
    return tgpq.quantize(pipe, tgpq.QuantConfig(method="rtn"), prompts=["a cat", "a dog"], guidance_scale=4.0,
                         num_inference_steps=6, num_trajectories=2, progress=False)


def _latents(pipe, seed=9):
    return pipe(["a bird"], num_inference_steps=4, guidance_scale=4.0, generator=[torch.Generator().manual_seed(seed)],
                output_type="latent").images


def test_unet_folder_layout_and_roundtrip(qunet, tmp_path):
    tgpq.save_pretrained(qunet, tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["config.json", WEIGHTS]
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["_class_name"] == "UNet2DModel" and cfg["block_out_channels"] == [16, 32, 32]
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "tgpq" and qc["format"] == "tgpq-quantized-unet" and qc["version"] == 2
    assert qc["weights"] == WEIGHTS and tgpq.QuantConfig.from_dict(qc["quant_config"]) == qunet.tgpq_config
    r = tgpq.from_pretrained(tmp_path / "q", backend="reference")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(r(x, 321).sample, qunet(x, 321).sample)
    # the weights file is exactly a tgpq.save file
    r2 = tgpq.load(tmp_path / "q" / WEIGHTS, backend="reference")
    with torch.no_grad():
        assert torch.equal(r2(x, 321).sample, qunet(x, 321).sample)


def test_pipeline_folder_roundtrip_samples_identically(qpipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    tgpq.save_pretrained(qpipe, tmp_path / "p")
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert "quantization_config" in json.loads((tmp_path / "p" / "unet" / "config.json").read_text())
    assert (tmp_path / "p" / "text_encoder" / "model.safetensors").is_file()  # components saved as diffusers does
    assert "save_pretrained" not in vars(qpipe.unet)  # the UNet's own method is back
    r = tgpq.from_pretrained(tmp_path / "p")
    assert type(r) is StableDiffusionPipeline and r.unet.tgpq_router is not None
    assert r.unet.tgpq_config == qpipe.unet.tgpq_config
    r.set_progress_bar_config(disable=True)
    assert torch.equal(_latents(r), _latents(qpipe))
    assert not list((tmp_path / "p").rglob(".*tmp*"))  # no temporary files left


def test_plain_diffusers_refuses_the_quantized_unet(qpipe, tmp_path):
    from diffusers import UNet2DConditionModel

    tgpq.save_pretrained(qpipe.unet, tmp_path / "u")
    with pytest.raises(ValueError, match="tgpq"):
        UNet2DConditionModel.from_pretrained(tmp_path / "u")


def _one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_plain_diffusers_folders_are_refused(tmp_path):
    unet = make_small_unet(seed=6)
    unet.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError) as e:
        tgpq.from_pretrained(tmp_path / "plain")
    _one_line(e, str(tmp_path / "plain" / "config.json"), "no quantization_config")
    pipe = make_sd_pipeline(tmp_path / "src")
    pipe.save_pretrained(tmp_path / "plain_pipe")
    with pytest.raises(ValueError) as e:
        tgpq.from_pretrained(tmp_path / "plain_pipe")
    _one_line(e, str(tmp_path / "plain_pipe" / "unet" / "config.json"), "no quantization_config")
    with pytest.raises(FileNotFoundError):
        tgpq.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers folder"):
        tgpq.from_pretrained(tmp_path / "empty")


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case,needle", [
    ("flip_weight_byte", "checksum mismatch"),
    ("config_norm_eps", "'norm_eps'"),
    ("config_class", "_class_name"),
    ("quant_config_bits", "'weight_bits'"),
    ("weights_sha256", "weights_sha256"),
    ("quant_method", "not by tgpq"),
    ("format_version", "version 99"),
    ("weights_path", "not a file name"),
    ("weights_missing", "no such file"),
    ("config_not_json", "not valid JSON"),
])
def test_tampered_or_mismatched_unet_folders_fail_in_one_line(qunet, tmp_path, case, needle):
    folder = tmp_path / "q"
    tgpq.save_pretrained(qunet, folder)
    cfg, weights = folder / "config.json", folder / WEIGHTS
    if case == "flip_weight_byte":
        raw = bytearray(weights.read_bytes())
        raw[-100] ^= 0x01
        weights.write_bytes(bytes(raw))
    elif case == "config_norm_eps":
        _edit_json(cfg, lambda d: d.update(norm_eps=1e-2))
    elif case == "config_class":
        _edit_json(cfg, lambda d: d.update(_class_name="UNet2DConditionModel"))
    elif case == "quant_config_bits":
        _edit_json(cfg, lambda d: d["quantization_config"]["quant_config"].update(weight_bits=4))
    elif case == "weights_sha256":
        _edit_json(cfg, lambda d: d["quantization_config"].update(weights_sha256="0" * 64))
    elif case == "quant_method":
        _edit_json(cfg, lambda d: d["quantization_config"].update(quant_method="bitsandbytes_8bit"))
    elif case == "format_version":
        _edit_json(cfg, lambda d: d["quantization_config"].update(version=99))
    elif case == "weights_path":
        _edit_json(cfg, lambda d: d["quantization_config"].update(weights="../" + WEIGHTS))
    elif case == "weights_missing":
        weights.unlink()
    elif case == "config_not_json":
        cfg.write_text("{ not json")
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        tgpq.from_pretrained(folder)
    _one_line(e, needle)
    expected_file = str(weights) if case in ("flip_weight_byte", "weights_missing") else str(cfg)
    assert expected_file in str(e.value)


def test_pipeline_index_may_not_name_custom_code(qpipe, tmp_path):
    folder = tmp_path / "p"
    tgpq.save_pretrained(qpipe, folder)
    index = folder / "model_index.json"
    original = index.read_text()
    for edit, needle in ((lambda d: d.update(_class_name=["pipeline", "MyPipeline"]), "not a diffusers pipeline"),
                         (lambda d: d.update(vae=["evil_module", "AutoencoderKL"]), "only ('diffusers', 'transformers')")):
        index.write_text(original)
        _edit_json(index, edit)
        with pytest.raises(ValueError) as e:
            tgpq.from_pretrained(folder)
        _one_line(e, str(index), needle)


def test_save_pretrained_refuses_float_models_and_bad_outputs(tmp_path):
    with pytest.raises(ValueError, match="converted by tgpq"):
        tgpq.save_pretrained(make_small_unet(), tmp_path / "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        tgpq.save_pretrained(make_small_unet(), tmp_path / "file")
    with pytest.raises(ValueError, match="no such folder"):
        tgpq.save_pretrained(make_small_unet(), tmp_path / "a" / "b")


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_quantize_a_pipeline_folder_with_prompts(tmp_path, capsys):
    pipe = make_sd_pipeline(tmp_path / "src")
    pipe.save_pretrained(tmp_path / "sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na red dog\n")
    out = tmp_path / "sd-w8a8"
    argv = ["quantize", "--model", str(tmp_path / "sd"), "--bits", "W8A8", "--method", "rtn", "--out", str(out),
            "--steps", "5", "--trajectories", "2", "--guidance-scale", "4"]
    assert main(argv) == 2  # a text-to-image pipeline needs prompts
    assert "--prompts" in capsys.readouterr().err
    assert main(argv + ["--prompts", str(prompts)]) == 0, capsys.readouterr().err
    q = tgpq.from_pretrained(out)
    assert q.unet.tgpq_config.method == "rtn" and q.unet.tgpq_router is not None
    q.set_progress_bar_config(disable=True)
    assert _latents(q).shape == (1, 4, 8, 8)
    assert main(["quantize", "--model", str(out), "--method", "rtn", "--out", str(tmp_path / "again"),
                 "--prompts", str(prompts)]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_cli_quantize_a_unet_folder(tmp_path, capsys):
    make_small_unet(seed=8).save_pretrained(tmp_path / "unet")
    out = tmp_path / "unet-w8a8"
    assert main(["quantize", "--model", str(tmp_path / "unet"), "--method", "rtn", "--out", str(out), "--steps", "5",
                 "--trajectories", "2", "--scheduler", "euler"]) == 0, capsys.readouterr().err
    q = tgpq.from_pretrained(out)
    assert type(q).__name__ == "UNet2DModel" and q.tgpq_router is not None
    assert main(["sample", "--model", str(out), "--num", "2", "--steps", "3", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()


@pytest.mark.parametrize("argv,needle", [
    (["--model", "{tmp}/nope"], "no such folder"),
    (["--model", "{tmp}/unet", "--prompts", "{tmp}/none.txt"], "--prompts"),
    (["--model", "{tmp}/unet", "--bits", "W3A8"], "supported"),
    (["--model", "{tmp}/unet", "--trajectories", "0"], "--trajectories"),
    (["--model", "{tmp}/unet", "--out", "{tmp}/unet"], "is the model folder"),
    (["--model", "{tmp}/unet", "--out", "{tmp}/a/b/c"], "no such folder"),
])
def test_cli_quantize_user_errors_are_one_line(tmp_path, capsys, argv, needle):
    make_small_unet(seed=8).save_pretrained(tmp_path / "unet")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert main(["quantize", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tgpq: error:") and needle in err[0], err
