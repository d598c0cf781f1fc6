import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastdpo.cli import main

# the documented contract
SUBCOMMANDS = ["demo", "sft", "pairs", "train", "eval", "bench", "serve", "label", "export", "tokenizer",
               "audit", "loop"]


def test_help_and_version(capsys):
    assert main([]) == 0
    assert "fastdpo" in capsys.readouterr().out
    assert main(["version"]) == 0
    assert "torch" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "fastdpo.cli", "--help"], capture_output=True, text=True,
                         check=True)
    assert "usage: fastdpo" in out.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_documented_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: fastdpo {command}" in capsys.readouterr().out


def test_installed_fastdpo_script_runs():
    """The console script setup.py installs, as a user runs it (next to this interpreter)."""
    script = Path(sys.executable).parent / "fastdpo"
    if not script.is_file():
        pytest.skip(f"fastdpo is not installed as a script next to {sys.executable}")
    env = {**os.environ, "PATH": f"{script.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    assert shutil.which("fastdpo", path=env["PATH"]) == str(script)
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True, env=env)
    assert "usage: fastdpo" in out.stdout
    assert all(c in out.stdout for c in SUBCOMMANDS)
