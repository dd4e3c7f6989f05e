import subprocess
import sys

from eaft_megatron.cli import main


def test_info_prints_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "megatron-core" in out and "torch" in out


def test_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "eaft_megatron", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "info" in res.stdout
