"""fastdpo's shipped configs and judge rubrics (package data: found from any working directory)."""
from importlib.resources import files
from pathlib import Path


def config_path(name: str) -> Path:
    """The installed file ``name`` (e.g. ``demo.yaml``, ``judge_score.txt``)."""
    path = Path(str(files(__name__) / name))
    if not path.is_file():
        raise FileNotFoundError(f"fastdpo ships no config named {name!r}")
    return path
