"""A fastdpo checkpoint (or a Hugging Face directory) as a directory transformers loads with no custom
code: ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` (and therefore
vLLM) read it.

Written: config.json (transformers' own architecture for the family: GPT2LMHeadModel,
LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM), the weights as
safetensors (sharded with an index above ``max_shard_bytes``), generation_config.json (sampling
stops at the template's end-of-turn token) and the tokenizer: tokenizer.json plus a
tokenizer_config.json holding the chat template as jinja. The directory appears atomically.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastdpo.files import write_json
from fastdpo.models.checkpoint import load_checkpoint, load_tokenizer, write_directory
from fastdpo.models.hf_config import config_to_hf
from fastdpo.models.hf_weights import hf_state_dict, write_hf_weights
from fastdpo.models.tokenizer import ChatTokenizer, open_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(ckpt: str | Path, out: str | Path, *, tokenizer: ChatTokenizer | str | Path | None = None,
              dtype: str = "float32", overwrite: bool = False, max_shard_bytes: int = 5 << 30) -> Path:
    """Write ``ckpt`` (with its own tokenizer unless ``tokenizer`` is given) to the directory
    ``out`` in transformers' format; ``dtype`` is the weights' dtype on disk. Returns ``out``."""
    ckpt, out = Path(ckpt), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if out.resolve() == ckpt.resolve():
        raise ValueError(f"{out}: the export would replace the checkpoint it reads; choose another directory")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; choose a new directory or pass --overwrite")
    tok = tokenizer if isinstance(tokenizer, ChatTokenizer) else (
        open_tokenizer(tokenizer) if tokenizer is not None else load_tokenizer(ckpt))
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

    return write_directory(out, fill)
