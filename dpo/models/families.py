"""Model families: which class a config builds, and the named shapes of every family.

Every family meets one contract (the kernels, the sampler and the trainer rely on it):
``model(ids, pos=None, kv_caches=None, attn_mask=None) -> logits``, ``model.hidden_states(...)``
after the final norm, ``model.lm_head_weight`` (V, C), ``model.blocks`` (the decoder blocks),
``model.config`` (a dataclass with ``n_layer``, ``block_size``, ``vocab_size``, ``to_dict`` and
``from_dict``) and ``model.family``, the name checkpoints record.
"""
from __future__ import annotations

import torch.nn as nn

from fastdpo.models import gpt, llama, memory

FAMILIES: dict[str, tuple[type, type]] = {
    "gpt2": (gpt.GPTConfig, gpt.GPT),
    "llama": (llama.LlamaConfig, llama.Llama),
}
# preset name -> (family, shape); vocab_size is usually overridden by the tokenizer's size
PRESETS: dict[str, tuple[str, dict]] = {
    **{name: ("gpt2", shape) for name, shape in gpt.PRESETS.items()},
    **{name: ("llama", shape) for name, shape in llama.PRESETS.items()},
}


def family_of(config) -> str:
    """The family name of a model config (or of a model)."""
    config = getattr(config, "config", config)
    for name, (config_cls, _) in FAMILIES.items():
        if isinstance(config, config_cls):
            return name
    raise TypeError(f"{type(config).__name__} is not the config of a known model family")


def config_from_dict(family: str, values: dict):
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family][0].from_dict(values)


def build_model(config) -> nn.Module:
    """A freshly initialised model of ``config``'s family (on the CPU), refused with a
    ``ConfigError`` first when its weights cannot fit in the memory available."""
    model_cls = FAMILIES[family_of(config)][1]
    memory.check_weights_fit(model_cls, config, "cpu")
    return model_cls(config)


def check_fits_on(config, device) -> None:
    """``ConfigError`` unless ``config``'s weights fit on ``device`` (a GPU's memory, say)."""
    memory.check_weights_fit(FAMILIES[family_of(config)][1], config, device)


def config_from_preset(name: str, **overrides):
    """The config of a named shape (``tiny``, ``gpt2-mid``, ``gpt2-124m``, ``llama-tiny``, ``llama-124m``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    family, shape = PRESETS[name]
    return FAMILIES[family][0](**{**shape, **overrides})
