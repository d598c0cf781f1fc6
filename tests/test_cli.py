import subprocess
import sys

from dpo.cli import main


def test_help_and_version(capsys):
    assert main([]) == 0
    assert "fastdpo" in capsys.readouterr().out
    assert main(["version"]) == 0
    assert "torch" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "dpo.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: fastdpo" in out.stdout
