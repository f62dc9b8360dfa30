"""benchmarks/quality.py in its ``--quick`` setting: the table, its metrics, and the torchrun data-parallel path."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tgpq

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "quality.py"
# W8A8 only, rtn + gac, batch 4 (so a 2-rank run samples the same batch size as one process)
QUICK = ["--quick", "--bits", "W8A8", "--batch-size", "4", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _fixed_kernel():
    """One cpu kernel family in every process: ``auto`` measures oneDNN against the microkernels per process
    on VNNI, and the two families' epilogues differ in the last bit, which moves PSNR in its 2nd decimal."""
    from tgpq.backends import cpu as cb

    return cb.force_kernel("ukernel")


@pytest.fixture(scope="module")
def single_run(quality, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "quality"
    threads = torch.get_num_threads()
    try:
        with _fixed_kernel():
            doc = quality.main(QUICK + ["--methods", "rtn", "gac", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # --threads 1; restore for the other tests
    return doc, out


def test_noise_of_a_strided_slice_matches_the_full_set():
    from tgpq.eval.sampling import initial_noise

    full = initial_noise(7, (3, 4, 4), seed=5)
    torch.testing.assert_close(initial_noise(3, (3, 4, 4), seed=5, first=1, stride=2), full[1::2], rtol=0, atol=0)


def test_quick_table_rows_and_metrics(single_run):
    doc, out = single_run
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(doc))
    rows = {r["name"]: r for r in saved["rows"]}
    assert list(rows) == ["FP", "W8A8 rtn", "W8A8 gac"]
    s = saved["settings"]
    assert (s["images"], s["steps"], s["world_size"]) == (8, 2, 1)
    for key in ("device", "torch", "date", "command", "calibration", "backend"):
        assert s[key], key
    assert "--quick" in s["command"] and s["calibration"]["traj"] == 2
    for name, r in rows.items():
        assert r["images_evaluated"] == 8
        for k in ("feature_fd", "precision", "recall"):
            assert math.isfinite(r[k]), (name, k, r[k])
        assert r["weight_bytes"] > 0
    fp = rows.pop("FP")
    assert fp["psnr_vs_fp_db"] is None and fp["ssim_vs_fp"] is None and fp["calib_seconds"] is None
    assert fp["weight_bytes"] == 4 * sum(t.numel() for t in tgpq.load_reference_model().state_dict().values())
    for name, r in rows.items():
        assert math.isfinite(r["psnr_vs_fp_db"]) and r["psnr_vs_fp_db"] > 10, (name, r["psnr_vs_fp_db"])
        assert 0 < r["ssim_vs_fp"] <= 1
        assert r["calib_seconds"] > 0 and Path(r["model_file"]).is_file()
        assert r["weight_bytes"] < fp["weight_bytes"] / 3  # int8 weights vs float32
    md = out.with_suffix(".md").read_text()
    assert "8 images per model, 2-step DDIM" in md and "Command: `" in md
    for name in ("FP", "W8A8 rtn", "W8A8 gac"):
        assert f"| {name} |" in md


def test_missing_inception_file_is_a_one_line_error(quality, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        quality.main(["--quick", "--inception", "/nonexistent", "--out", str(tmp_path / "q")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "/nonexistent" in err, err
    assert not list(tmp_path.iterdir())


def _gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is not available")
def test_torchrun_two_ranks_gathers_the_same_images(single_run, tmp_path):
    out = tmp_path / "quality"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           *QUICK, "--methods", "rtn", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TGPQ_CPU_KERNEL="ukernel")  # as _fixed_kernel
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["settings"]["world_size"] == 2 and doc["settings"]["command"].startswith("torchrun --nproc_per_node 2")
    single = {r["name"]: r for r in single_run[0]["rows"]}
    rows = {r["name"]: r for r in doc["rows"]}
    assert list(rows) == ["FP", "W8A8 rtn"]
    for r in rows.values():
        assert r["images_evaluated"] == doc["settings"]["images"] == 8
    for k in ("feature_fd", "precision", "recall"):  # same seeds -> same FP images, however they are split
        assert rows["FP"][k] == pytest.approx(single["FP"][k], abs=1e-4), k
    # rank 0 calibrated rtn on the same calibration set; rank 1 sampled from the model file it saved
    assert rows["W8A8 rtn"]["psnr_vs_fp_db"] == pytest.approx(single["W8A8 rtn"]["psnr_vs_fp_db"], abs=1e-4)
