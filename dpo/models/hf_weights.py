"""fastdpo <-> transformers parameter names and the safetensors files of a ``save_pretrained`` directory.

fastdpo's modules are named as transformers names them (``transformer.h.0.attn.c_attn`` for GPT-2,
``model.layers.0.self_attn.q_proj`` for the Llama family), so the mapping is short:

- GPT-2's attention and MLP projections are ``Conv1D`` in transformers, whose weight is stored
  (in, out): fastdpo's ``nn.Linear`` weight is its transpose. The hub's original GPT-2 files also
  leave out the ``transformer.`` prefix and carry causal-mask buffers (``attn.bias``).
- A tied lm_head is not a separate tensor in fastdpo; a file may still hold a copy.

``to_hf_name`` / ``from_hf_name`` / ``is_conv1d`` are the mapping (a LoRA adapter saved in PEFT's
format names its target modules with ``to_hf_name``; PEFT wraps GPT-2's ``Conv1D`` targets with
``fan_in_fan_out``). Weights are read with safetensors only: pickled ``.bin`` files are refused.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastdpo.files import write_json
from fastdpo.models.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def to_hf_name(family: str, name: str) -> str:
    """transformers' name of a fastdpo parameter or module (the same string for both families)."""
    return name


def from_hf_name(family: str, hf_name: str) -> str | None:
    """fastdpo's name of a tensor in a transformers file, or None for tensors fastdpo does not keep
    (causal-mask buffers, cached RoPE frequencies, a tied lm_head's copy)."""
    if family == "gpt2":
        name = hf_name if hf_name.startswith(("transformer.", "lm_head.")) else f"transformer.{hf_name}"
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            return None
        return name
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    return hf_name


def is_conv1d(family: str, name: str) -> bool:
    """Whether transformers stores this weight transposed (GPT-2's Conv1D: (in, out))."""
    return family == "gpt2" and name.endswith(_CONV1D)


# -- reading ------------------------------------------------------------------------------------
def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index of a sharded checkpoint or
    the single ``model.safetensors``."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: field 'weight_map': missing or not JSON ({e})") from e
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE
    if single.is_file():
        return {name: single for name in _tensor_names(single)}
    pickled = [p.name for p in directory.iterdir()
               if p.name in _PICKLES or p.suffix in (".bin", ".pt", ".pth")]
    if pickled:
        raise CheckpointError(f"{directory / pickled[0]}: fastdpo never unpickles weights (a .bin/.pt "
                              f"file can run code); save the model with safetensors (save_pretrained's "
                              f"default) first")
    raise CheckpointError(f"{single}: missing (no {SINGLE} or {INDEX} in {directory})")


def _tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(str(file), "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from e


def read_hf_state(directory: Path, family: str, expected: dict[str, torch.Tensor],
                  tied: bool) -> dict[str, torch.Tensor]:
    """The tensors of ``directory`` as a fastdpo state dict shaped like ``expected`` (float32).
    A missing tensor, an extra one, a wrong shape or a quantized dtype is an error naming the file."""
    files = weight_files(directory)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for hf_name, file in files.items():
        name = from_hf_name(family, hf_name)
        if name is None or (tied and name == "lm_head.weight"):
            continue
        if name not in expected:
            raise CheckpointError(f"{file}: tensor '{hf_name}' is not part of this model's config "
                                  f"(another architecture or a head fastdpo does not train?)")
        by_file.setdefault(file, []).append((hf_name, name))
    missing = sorted(set(expected) - {n for pairs in by_file.values() for _, n in pairs})
    if missing:
        where = directory / INDEX if (directory / INDEX).is_file() else directory / SINGLE
        raise CheckpointError(f"{where}: missing tensor '{to_hf_name(family, missing[0])}'"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    state = {}
    for file, pairs in by_file.items():
        for name, tensor in _read(file, pairs):
            if tensor.dtype not in _FLOATS:
                raise CheckpointError(f"{file}: tensor '{name}' has dtype {tensor.dtype}; quantized weights "
                                      f"are not supported")
            tensor = tensor.float()
            if is_conv1d(family, name):
                tensor = tensor.t()
            if tensor.shape != expected[name].shape:
                raise CheckpointError(f"{file}: tensor '{to_hf_name(family, name)}' has shape "
                                      f"{tuple(tensor.shape)}, the config implies "
                                      f"{tuple(expected[name].shape)}")
            state[name] = tensor.contiguous()
    return state


def _read(file: Path, pairs: list[tuple[str, str]]) -> Iterator[tuple[str, torch.Tensor]]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (listed in {INDEX})")
    try:
        with safe_open(str(file), "pt") as f:
            for hf_name, name in pairs:
                yield name, f.get_tensor(hf_name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from e


# -- writing ------------------------------------------------------------------------------------
def hf_state_dict(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names and layouts (no tied lm_head copy)."""
    family = model.family
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu", dtype)
        out[to_hf_name(family, name)] = (t.t() if is_conv1d(family, name) else t).contiguous()
    return out


def write_hf_weights(state: dict[str, torch.Tensor], directory: Path,
                     max_shard_bytes: int = 5 << 30) -> list[Path]:
    """``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` plus the index when the
    weights exceed ``max_shard_bytes``. Returns the files written."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE, metadata={"format": "pt"})
        return [directory / SINGLE]
    written, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        file = directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, file, metadata={"format": "pt"})
        weight_map.update({name: file.name for name in shard})
        written.append(file)
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(directory / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*written, directory / INDEX]
