"""The command line: help lists subcommands; user errors are one line with a non-zero exit."""
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
