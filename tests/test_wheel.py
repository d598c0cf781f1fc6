"""A regular install, as a user gets it: build a wheel from the repository, install it into a fresh
virtual environment next to unrelated packages named ``kernels`` and ``bench`` (both exist on the
package index), and run ``fastdpo demo --quick`` from an empty directory that also holds folders
with those names. Only ``fastdpo`` may be a top-level import name of ours, and the shipped configs
and judge rubrics must be found from anywhere."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    # a copy: building in place would leave build/ and *.egg-info in the repository
    src = tmp_path_factory.mktemp("src") / "fastdpo"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "runs",
                                                             "__pycache__", ".venv"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
          str(src)], env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return next(dist.glob("fastdpo-*.whl"))


def test_wheel_has_one_top_level_name_and_ships_the_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"fastdpo"}
    for f in ("demo.yaml", "dpo.yaml", "sft.yaml", "judge_score.txt", "judge_compare.txt"):
        assert f"fastdpo/configs/{f}" in names


def test_installed_wheel_runs_the_demo_from_an_empty_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([str(py), "-c", purelib]).stdout.strip())
    # torch and the other dependencies come from the test's own environment (appended after the
    # new venv's own site-packages; its .pth files, such as an editable fastdpo, are not read).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
         env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    work = tmp_path / "empty"
    for where in (site, work):          # clashing names, installed and in the working directory
        for name in ("kernels", "bench"):
            (where / name).mkdir(parents=True)
            (where / name / "__init__.py").write_text("BACKENDS = None  # not fastdpo's\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    probe = _run([str(py), "-c", "import fastdpo, fastdpo.kernels, fastdpo.generation.judge as j; "
                  "from fastdpo import TrainingConfig; TrainingConfig(); "
                  "print(fastdpo.__file__, fastdpo.kernels.__file__, j.SCORE_PROMPT.is_file())"],
                 cwd=work, env=env).stdout.split()
    assert all(str(venv) in p for p in probe[:2]) and probe[2] == "True"
    out = _run([str(venv / "bin" / "fastdpo"), "demo", "--quick", "--out", "run"], cwd=work, env=env)
    assert (work / "run" / "summary.json").is_file(), out.stdout[-2000:]
