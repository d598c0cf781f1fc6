"""A local Hugging Face model directory (``save_pretrained``: config.json + safetensors, sharded or
not) as a fastdpo model: the config mapped by ``hf_config``, the tensors by ``hf_weights``, every
weight upcast to float32 (training keeps float32 master weights; autocast does the rest)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fastdpo.models.errors import CheckpointError
from fastdpo.models.families import build_model
from fastdpo.models.hf_config import config_from_hf
from fastdpo.models.hf_weights import read_hf_state

CONFIG = "config.json"


def read_hf_config(directory: str | Path) -> dict | None:
    """The directory's config.json if it is a transformers model config (it has ``model_type``),
    else None."""
    file = Path(directory) / CONFIG
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return config if isinstance(config, dict) and "model_type" in config and "format" not in config else None


def is_hf_model_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and read_hf_config(path) is not None


def load_hf_model(directory: str | Path, map_location="cpu") -> tuple[torch.nn.Module, dict]:
    """``(model, info)``: the model in float32 on ``map_location`` and a summary in the shape of a
    fastdpo checkpoint's config (``family``, ``model``, ``step`` 0, ``hf_model_type``, ``source``)."""
    directory = Path(directory)
    hf = read_hf_config(directory)
    if hf is None:
        raise CheckpointError(f"{directory / CONFIG}: missing, or not a transformers model config "
                              f"(no 'model_type')")
    family, config = config_from_hf(hf, directory / CONFIG)
    with torch.device("meta"):   # no random init: every tensor comes from the files
        model = build_model(config)
    tied = getattr(config, "tie_word_embeddings", True)   # GPT-2's head is always the embedding
    state = read_hf_state(directory, family, model.state_dict(), tied=tied)
    model.load_state_dict(state, strict=True, assign=True)
    info = {"family": family, "model": config.to_dict(), "step": 0, "hf_model_type": hf["model_type"],
            "source": str(directory)}
    return model.to(map_location), info
