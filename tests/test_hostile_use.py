"""Careless and hostile use (issue 14): nothing silently wrong. Each test failed before its fix."""
from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
import torch
from conftest import make_small_unet, minmax_qstate

import tgpq
from tgpq.backends import library

DATA = Path(__file__).resolve().parent / "data"
BACKENDS = ["reference"] + (["cpu"] if library.has_extension() else [])


@pytest.fixture(scope="module")
def converted_state():
    unet = make_small_unet(seed=1)
    qs = minmax_qstate(unet, tgpq.QuantConfig(weight_bits=8, method="rtn"))
    return unet, qs


# ---------------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_on_different_groups_match_sequential_results(converted_state, backend):
    unet, qs = converted_state
    q = tgpq.convert(unet, qs, backend=backend)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = {t: q(x, t).sample for t in (100, 900)}
    assert not torch.equal(expected[100], expected[900])
    start = threading.Barrier(2)
    mismatches, errors = [], []

    def worker(t):
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(15):
                    if not torch.equal(q(x, t).sample, expected[t]):
                        mismatches.append(t)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (100, 900)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and not mismatches, (errors, len(mismatches))


def test_calling_forward_directly_routes_the_timestep(converted_state):
    unet, qs = converted_state
    q = tgpq.convert(unet, qs, backend="reference")
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y900 = q(x, 900).sample
        q(x, 100)  # leaves group 0 selected
        assert torch.equal(q.forward(x, 900).sample, y900)


@pytest.mark.parametrize("t", [-1, 1000, 1500.0, torch.tensor([5, 1000])])
def test_out_of_range_timesteps_are_refused(converted_state, t):
    unet, qs = converted_state
    q = tgpq.convert(unet, qs, backend="reference")
    with pytest.raises(ValueError, match="outside"):
        q(torch.randn(2, 3, 16, 16), t)


def test_float_timesteps_map_like_their_rounded_integers(converted_state):
    """Router, calibration and simulation share one mapping: round half to even (collect truncated)."""
    unet, qs = converted_state
    q = tgpq.convert(unet, qs, backend="reference")
    table = qs.timestep_to_group
    edge = int(torch.nonzero(table[1:] != table[:-1])[0]) + 1  # the first timestep of group 1
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for t, expected in ((edge - 0.4, edge), (edge - 0.6, edge - 1), (edge - 0.5, edge - 1 + (edge - 1) % 2)):
            q(x, t)
            assert int(q.tgpq_router.group_index) == int(table[expected]), t
    from tgpq.nn import group_of, timestep_index
    assert int(timestep_index(torch.tensor(edge - 0.4))) == edge
    assert int(group_of(edge - 0.4, table)) == int(table[edge])


# ------------------------------------------------------------------------------------------ files
def _rewrite_header(src: Path, dst: Path, edit) -> None:
    """Copy a safetensors file, editing the tgpq JSON document in its header (the digest is kept)."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["tgpq"])
    edit(meta)
    header["__metadata__"]["tgpq"] = json.dumps(meta)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    dst.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])


@pytest.mark.parametrize("edit", [
    lambda m: m["unet_config"].update(norm_eps=1e-2),
    lambda m: m["unet_config"].update(act_fn="mish"),
    lambda m: m["unet_config"].update(flip_sin_to_cos=not m["unet_config"]["flip_sin_to_cos"]),
    lambda m: m["unet_config"].update(freq_shift=0),
    lambda m: next(s for s in m["layers"].values() if s["kind"] == "conv2d").update(padding=[2, 2]),
], ids=["norm_eps", "act_fn", "flip_sin_to_cos", "freq_shift", "layer_padding"])
def test_edited_metadata_fails_the_checksum(converted_state, tmp_path, edit):
    unet, qs = converted_state
    path = tmp_path / "q.safetensors"
    tgpq.save(tgpq.convert(unet, qs, backend="reference"), path)
    tgpq.load(path)
    _rewrite_header(path, tmp_path / "edited.safetensors", edit)
    with pytest.raises(ValueError, match="checksum"):
        tgpq.load(tmp_path / "edited.safetensors")


def test_files_saved_by_format_version_1_still_load():
    """Written by tgpq at b7a9fe4 (tensors-only digest); the loaded model computes what it computed then."""
    from safetensors.torch import load_file

    q = tgpq.load(DATA / "small-unet-w8a8-format-v1.safetensors", backend="reference")
    ref = load_file(DATA / "small-unet-w8a8-format-v1.expected.safetensors")
    with torch.no_grad():
        y = q(ref["x"], int(ref["t"])).sample
    assert torch.equal(y, ref["y"])


def test_saved_files_have_the_usual_permissions_and_no_leftovers(converted_state, tmp_path):
    unet, qs = converted_state
    old = os.umask(0o022)
    try:
        tgpq.save(tgpq.convert(unet, qs, backend="reference"), tmp_path / "q.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "q.safetensors").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors"]


# ---------------------------------------------------------------------------------- CPU fusion state
@pytest.mark.skipif(not library.has_extension(), reason="tgpq C++ extension not built")
def test_load_state_dict_reaches_the_fused_attention(converted_state):
    """The merged q/k/v of the CPU path follows the layers' state (it was a stale private copy)."""
    unet, qs = converted_state
    other = make_small_unet(seed=7)
    q_other = tgpq.convert(other, minmax_qstate(other, tgpq.QuantConfig(weight_bits=8, method="rtn")), backend="cpu")
    q = tgpq.convert(unet, qs, backend="cpu")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        q(x, 500)  # the fused attention has built its merged layer
        q.load_state_dict(q_other.state_dict())
        y, y_other = q(x, 500).sample, q_other(x, 500).sample
    assert torch.equal(y, y_other)


@pytest.mark.skipif(not library.has_extension(), reason="tgpq C++ extension not built")
def test_set_backend_reference_is_the_pure_oracle(converted_state):
    """After set_backend(q, "reference") no layer, the merged attention projection included, runs a CPU kernel."""
    unet, qs = converted_state
    q = tgpq.convert(unet, qs, backend="cpu")
    ref = tgpq.convert(unet, qs, backend="reference")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    tgpq.set_backend(q, "reference")
    with torch.no_grad(), torch.profiler.profile() as prof:  # every tgpq op call shows as "tgpq::..."
        y = q(x, 300).sample
    calls = [e.name for e in prof.events() if e.name.startswith("tgpq::")]
    assert not calls, sorted(set(calls))
    with torch.no_grad():
        assert torch.equal(y, ref(x, 300).sample)


# ------------------------------------------------------------------------------------------ convert
def test_convert_refuses_a_qstate_of_other_float_weights(converted_state):
    unet, qs = converted_state
    twin = make_small_unet(seed=2)  # same architecture, other weights
    with pytest.raises(ValueError, match="other float weights"):
        tgpq.convert(twin, qs)
    tgpq.convert(twin, qs, backend="reference", allow_other_weights=True)  # when told so
    assert tgpq.convert(make_small_unet(seed=1), qs, backend="reference") is not None  # same weights, new object


def test_fingerprint_ignores_the_storage_dtype(converted_state):
    import copy

    from tgpq.recipe import WeightsFingerprint

    unet, qs = converted_state
    for dtype in (torch.float16, torch.bfloat16):
        assert qs.float_fingerprint.matches(WeightsFingerprint.of(copy.deepcopy(unet).to(dtype)))
    assert not qs.float_fingerprint.matches(WeightsFingerprint.of(make_small_unet(seed=2)))


# ---------------------------------------------------------------------------------------------- NaN
def _isas():
    from tgpq.backends import cpu as cb
    return cb.supported_isas() if library.has_extension() else []


@pytest.mark.parametrize("isa", _isas())
def test_nan_activations_propagate_on_the_cpu_backend_like_the_reference(isa):
    """A NaN input makes exactly the outputs NaN that read it (receptive field / row), as in float."""
    from tgpq.backends import cpu as cb
    from tgpq.nn import QConv2d, QLinear
    from tgpq.numerics import mse_weight_scale, quantize_weight
    from tgpq.recipe import LayerQState

    gen = torch.Generator().manual_seed(5)
    conv, lin = torch.nn.Conv2d(16, 24, 3, padding=1), torch.nn.Linear(40, 8)
    layers = []
    for fl in (conv, lin):
        s = mse_weight_scale(fl.weight, 8)
        cls = QConv2d if isinstance(fl, torch.nn.Conv2d) else QLinear
        layers.append(cls.from_float(fl, LayerQState(quantize_weight(fl.weight, s, 8), s, torch.tensor([0.05])), 8))
    xc = torch.randn(2, 16, 9, 9, generator=gen)
    xc[0, 3, 4, 4] = float("nan")
    xl = torch.randn(5, 40, generator=gen)
    xl[2, 7] = float("nan")
    with cb.force_isa(isa), torch.no_grad():
        for layer, x in zip(layers, (xc, xl)):
            layer.backend = "reference"
            ref = layer(x)
            layer.backend = "cpu"
            got = layer(x)
            assert torch.isnan(ref).any() and not torch.isnan(ref).all()
            assert torch.equal(torch.isnan(got), torch.isnan(ref))
            ok = ~torch.isnan(ref)
            assert torch.allclose(got[ok], ref[ok], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_diverging_sample_shows_as_nan(converted_state, backend):
    unet, qs = converted_state
    q = tgpq.convert(unet, qs, backend=backend)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    x[0, 0, 5, 5] = float("nan")
    with torch.no_grad():
        y = q(x, 400).sample
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1]).any()


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field,value", [
    ("act_ema_momentum", 5.0), ("exclude", "conv_in"), ("iters", -5), ("lr_adaround", float("nan")),
    ("weight_bits", 8.0), ("tau", float("nan")), ("batch_size", 0), ("num_groups", 0), ("val_fraction", 1.0),
    ("act_quantile", 0.2), ("learn_act_scale", "yes"), ("seed", -1), ("adaround_beta", (2.0, 20.0)),
    ("lr_sample_logits", float("inf")), ("block_inputs", "float"), ("weight_steps", 2.5),
])
def test_every_bad_config_value_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"QuantConfig\.{field}="):
        tgpq.QuantConfig(**{field: value})


def test_every_config_field_has_a_validation_rule():
    import dataclasses

    from tgpq.recipe import config

    checked_by_hand = {"exclude", "adaround_beta", "extra"}
    assert {f.name for f in dataclasses.fields(tgpq.QuantConfig)} == set(config._RULES) | checked_by_hand


# -------------------------------------------------------------------------------------- calibration
def test_the_documented_call_works_for_any_step_count():
    from diffusers import DDIMScheduler

    unet = make_small_unet(seed=4)
    calib = tgpq.collect_calibration(unet, DDIMScheduler(num_train_timesteps=1000), num_trajectories=2, num_steps=20,
                                     progress=False)
    assert len(calib.kept_timesteps) >= 5
    qs = tgpq.calibrate(unet, calib, tgpq.QuantConfig(method="rtn"), progress=False)
    assert qs.config.num_groups == 5


@pytest.mark.parametrize("bad", [dict(groups=2), dict(padding="same"), dict(padding_mode="reflect")])
def test_unconvertible_layers_are_refused_before_calibration(bad):
    unet = make_small_unet(seed=4)
    c = unet.down_blocks[0].resnets[0].conv1
    kw = dict(in_channels=c.in_channels, out_channels=c.out_channels, kernel_size=3, padding=1)
    kw.update(bad)
    unet.down_blocks[0].resnets[0].conv1 = torch.nn.Conv2d(**kw)
    calib = object()  # never reached: the layers are checked first
    with pytest.raises((ValueError, TypeError), match="down_blocks.0.resnets.0.conv1"):
        tgpq.calibrate(unet, calib, tgpq.QuantConfig(method="rtn"), progress=False)


def test_collect_keeps_rounded_float_timesteps():
    """An Euler-style schedule at 7 steps has 499.5 (-> 500, round half to even; collect truncated to 499)."""
    from diffusers import EulerDiscreteScheduler

    unet = make_small_unet(seed=4)
    calib = tgpq.collect_calibration(unet, EulerDiscreteScheduler(num_train_timesteps=1000), num_trajectories=1,
                                     num_steps=7, interval=1, val_fraction=0.0, progress=False)
    assert 500 in calib.kept_timesteps.tolist() and 499 not in calib.kept_timesteps.tolist()
    assert set(calib.t.tolist()) == set(calib.kept_timesteps.tolist())


# ------------------------------------------------------------------------------------------ install
def test_a_cpu_only_install_without_triton_works(tmp_path):
    """Triton blocked: import, convert, a cpu/reference forward, save/load; the triton backend says what is
    missing in one line."""
    import subprocess
    import sys

    code = r'''
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton'")
sys.meta_path.insert(0, NoTriton())
import torch, tgpq
sys.path.insert(0, sys.argv[1])
from conftest import make_small_unet, minmax_qstate
unet = make_small_unet(seed=1)
q = tgpq.convert(unet, minmax_qstate(unet, tgpq.QuantConfig(weight_bits=8, method="rtn")))
with torch.no_grad():
    y = q(torch.randn(1, 3, 16, 16), 10).sample
tgpq.save(q, sys.argv[2]); tgpq.load(sys.argv[2])
assert "triton" not in sys.modules, "triton was imported"
from tgpq.backends import triton as tb
try:
    tb.kernels()
except RuntimeError as e:
    print("ERROR:", e)
'''
    # run outside the checkout: from its root, transformers (imported by diffusers when installed) probes a
    # top-level module named `kernels` (the Hugging Face package) and would import the repository's own
    # `kernels/` folder, hence triton, through the current folder on sys.path
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path / "q.safetensors")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    msg = [line for line in r.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(msg) == 1 and "tgpq[triton]" in msg[0]
