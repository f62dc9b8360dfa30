"""The command line: help lists subcommands; user errors are one line with a non-zero exit."""
import os
import subprocess
import sys

import pytest

from tgpq.cli import build_parser, main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "calibrate", "sample", "evaluate", "bench", "info"):
        assert cmd in out


@pytest.mark.parametrize("argv,needle", [
    (["sample", "--model", "/no/such/model"], "/no/such/model"),
    (["info", "/no/such/file.safetensors"], "/no/such/file.safetensors"),
    (["calibrate", "--bits", "W3A8", "--out", "x.safetensors"], "supported"),
    (["calibrate", "--bits", "int8", "--out", "x.safetensors"], "W<bits>A<bits>"),
])
def test_user_errors_are_one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tgpq: error:") and needle in err[0]


def test_corrupt_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.safetensors" in err[0]


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "tgpq.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "calibrate" in r.stdout


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    """A small diffusers UNet saved the diffusers way (its config then holds a `_name_or_path` path)."""
    from conftest import make_small_unet

    folder = tmp_path_factory.mktemp("unet")
    make_small_unet(seed=3).save_pretrained(folder)
    return folder


def test_calibrate_from_a_local_folder_saves(unet_folder, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    assert main(["calibrate", "--model", str(unet_folder), "--method", "rtn", "--trajectories", "2", "--steps", "10",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    import tgpq
    tgpq.load(out)


@pytest.mark.parametrize("argv", [
    ["calibrate", "--method", "rtn", "--out", "/no/such/folder/q.safetensors"],
    ["calibrate", "--method", "rtn", "--out", "{tmp}/q.safetensors", "--checkpoint", "/dev/null"],
    ["calibrate", "--method", "rtn", "--out", "{tmp}"],
    ["sample", "--out", "/dev/null/x.png"],
    ["demo", "--out", "/dev/null/x"],
    ["calibrate", "--method", "rtn", "--trajectories", "0", "--out", "{tmp}/q.safetensors"],
])
def test_bad_outputs_fail_in_one_line_before_the_work(argv, tmp_path, capsys, monkeypatch):
    import time

    monkeypatch.setattr("tgpq.unet.load_unet", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    monkeypatch.setattr("tgpq.unet.load_reference_model",
                        lambda *a, **k: pytest.fail("the model was loaded before the check"))
    t0 = time.perf_counter()
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tgpq: error:"), err
    assert time.perf_counter() - t0 < 10


def test_read_only_output_folder(tmp_path, capsys, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    assert main(["calibrate", "--method", "rtn", "--out", str(ro / "q.safetensors")]) == 2
    assert "not writable" in capsys.readouterr().err
