"""A fastdpo checkpoint (or a Hugging Face directory) as a directory transformers loads with no custom
code: ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` (and therefore
vLLM) read it.

Written: config.json (transformers' own architecture for the family: GPT2LMHeadModel,
LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM), the weights as
safetensors (sharded with an index above ``max_shard_bytes``), generation_config.json (sampling
stops at the template's end-of-turn token) and the tokenizer: tokenizer.json plus a
tokenizer_config.json holding the chat template as jinja; for a LoRA checkpoint, the base model
and ``adapter/`` (PEFT files) unless the adapter is merged. The directory appears atomically.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from fastdpo.files import write_json
from fastdpo.models import lora
from fastdpo.models.checkpoint import (
    load_base,
    load_checkpoint,
    load_tokenizer,
    read_config,
    write_directory,
)
from fastdpo.models.errors import CheckpointError
from fastdpo.models.hf_config import config_to_hf
from fastdpo.models.hf_import import is_hf_model_dir
from fastdpo.models.hf_weights import hf_state_dict, write_hf_weights
from fastdpo.models.tokenizer import ChatTokenizer, open_tokenizer

ADAPTER_DIR = "adapter"
SOURCE_FILE = "fastdpo_source.json"   # the checkpoint an export was written from
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(ckpt: str | Path, out: str | Path, *, tokenizer: ChatTokenizer | str | Path | None = None,
              dtype: str = "float32", overwrite: bool = False, max_shard_bytes: int = 5 << 30,
              merge: bool = False) -> Path:
    """Write ``ckpt`` (with its own tokenizer unless ``tokenizer`` is given) to the directory
    ``out`` in transformers' format; ``dtype`` is the weights' dtype on disk. Returns ``out``.

    A checkpoint holding a LoRA adapter is written as its base model in ``out`` and the adapter,
    in the PEFT format, in ``out/adapter`` (its ``base_model_name_or_path`` is ``out``): what
    ``peft`` and vLLM's LoRA loading (``--lora-modules``, ``/v1/load_lora_adapter``) take. With
    ``merge`` the adapter is merged into the weights instead and ``out`` alone is the model."""
    ckpt, out = Path(ckpt), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if out.resolve() == ckpt.resolve():
        raise ValueError(f"{out}: the export would replace the checkpoint it reads; choose another directory")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; choose a new directory or pass --overwrite")
    tok = tokenizer if isinstance(tokenizer, ChatTokenizer) else (
        open_tokenizer(tokenizer) if tokenizer is not None else load_tokenizer(ckpt))
    adapter = not merge and lora.is_adapter_dir(ckpt) and not is_hf_model_dir(ckpt)
    if adapter:
        try:
            model = load_base(ckpt, read_config(ckpt), tokenizer=tok)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; pass --merge to export the merged weights instead") from e
    else:
        model, _ = load_checkpoint(ckpt, tokenizer=tok)
    ids = tok.special_ids()
    eos = ids.get("eos_token", tok.eos_id)
    config = config_to_hf(model.config, dtype=dtype, bos_id=ids.get("bos_token"), eos_id=eos,
                          pad_id=tok.pad_id)
    generation = {"bos_token_id": ids.get("bos_token"), "eos_token_id": sorted({tok.eos_id, eos}),
                  "pad_token_id": tok.pad_id}

    def fill(tmp: Path) -> None:
        write_hf_weights(hf_state_dict(model, DTYPES[dtype]), tmp, max_shard_bytes)
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", generation)
        tok.save_hf(tmp, model_max_length=model.config.block_size)
        if adapter:
            write_adapter_copy(ckpt, tmp / ADAPTER_DIR, base_model_name_or_path=str(out.resolve()))
        # what the weights are, so a reader can tell a stale or base-only export from the policy
        write_json(tmp / SOURCE_FILE, {"checkpoint": str(ckpt.resolve()), "weights": "base" if adapter else
                                       "merged" if lora.is_adapter_dir(ckpt) else "full"})

    return write_directory(out, fill)


def write_adapter_copy(ckpt: Path, directory: Path, base_model_name_or_path: str) -> None:
    """The checkpoint's PEFT adapter files in ``directory``, pointing at the exported base."""
    directory.mkdir()
    shutil.copyfile(ckpt / lora.ADAPTER_WEIGHTS, directory / lora.ADAPTER_WEIGHTS)
    config = json.loads((ckpt / lora.ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = base_model_name_or_path
    write_json(directory / lora.ADAPTER_CONFIG, config)
