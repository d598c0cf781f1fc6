"""LoRA adapters on a model's linear projections, and their files in the PEFT format.

``apply_lora`` turns chosen ``nn.Linear`` modules into ``LoRALinear``: the same module (an
``nn.Linear`` subclass holding the same weight and bias, under the same names) plus a low-rank
update ``y = x W^T + b + s * B(A(dropout(x)))``, ``s = alpha / rank`` (``alpha / sqrt(rank)``
with rsLoRA). ``B`` starts at zero, so a fresh adapter is a no-op, and every other parameter is
frozen. Targets are matched by module name, so any family's projections work: GPT-2's ``c_attn``,
``c_proj``, ``c_fc``, a Llama family's ``q_proj`` ... ``down_proj``; ``all`` means every linear
module except the output head. The head is never adapted: the fused log-prob kernel reads
``model.lm_head_weight`` directly, and an adapted head would need the merged (V, C) weight and its
full float32 gradient at every step, which is what LoRA is there to avoid.

Files: ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's keys
(``base_model.model.<Hugging Face module name>.lora_A.weight``), which ``peft`` and vLLM's LoRA
loader read. Module names are mapped to the Hugging Face model's per family (``PEFT_NAMES``);
GPT-2's projections are ``Conv1D`` there (weights stored (in, out)), so its adapters are marked
``fan_in_fan_out``, which changes how PEFT merges them, not the adapter tensors.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a low-rank adapter; its ``weight`` and ``bias`` are the base module's."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.adapter_enabled = True
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # PEFT's initialisation
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` (out, in), in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def _plain_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's own linear modules (adapted ones included, the adapters' A and B not)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".lora_" not in f".{n}"}


def _is_head(model: nn.Module, module: nn.Linear) -> bool:
    head = getattr(model, "lm_head_weight", None)
    return head is not None and module.weight is head


def match_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the linear modules ``targets`` selects: ``all`` (every one but the output head),
    or module names matched as a whole name or a dotted suffix (``c_proj`` is every ``c_proj``,
    ``mlp.c_proj`` only the MLP's). A target that matches nothing is an error."""
    linears = {n: m for n, m in _plain_linears(model).items() if not isinstance(m, LoRALinear)}
    if list(targets) == ["all"]:
        return [n for n, m in linears.items() if not _is_head(model, m)]
    chosen = []
    for t in targets:
        hits = [n for n in linears if n == t or n.endswith("." + t)]
        if not hits:
            names = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"lora_target {t!r} matches no linear module of {type(model).__name__} "
                             f"(its linear modules are named {names})")
        if any(_is_head(model, linears[n]) for n in hits):
            raise ValueError(f"lora_target {t!r} selects the output head; adapting it is not supported "
                             f"(the fused log-prob kernel reads lm_head_weight directly)")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def apply_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
               rslora: bool = False) -> list[str]:
    """Adapters on the modules ``targets`` selects (see ``match_targets``); every parameter but the
    adapters' is frozen. Returns the adapted module names."""
    names = match_targets(model, targets)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, alpha, dropout, rslora))
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_A." in pname or ".lora_B." in pname)
    return names


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model: every adapter switched off inside the block."""
    mods = list(lora_modules(model).values())
    before = [m.adapter_enabled for m in mods]
    for m in mods:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, on in zip(mods, before):
            m.adapter_enabled = on


def adapters_are_noop(model: nn.Module) -> bool:
    """Whether every adapter's ``B`` is zero (a fresh adapter), i.e. the model computes its base."""
    return all(not m.lora_B.weight.any() for m in lora_modules(model).values())


def function_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that decide what the model computes right now: its state dict without the
    adapters that are switched off (so the base under ``adapters_disabled`` hashes as the base)."""
    state = model.state_dict()
    for name, m in lora_modules(model).items():
        if not m.adapter_enabled:
            for k in (f"{name}.lora_A.weight", f"{name}.lora_B.weight"):
                state.pop(k, None)
    return state


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter added into its weight (the model is left as
    it is): what a plain model of the family loads."""
    mods = lora_modules(model)
    state = {k: v for k, v in model.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}
    for name, m in mods.items():
        w = state[f"{name}.weight"]
        state[f"{name}.weight"] = (w.float() + m.delta_weight()).to(w.dtype)
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Add every adapter into its base weight and put plain ``nn.Linear`` modules back (in place)."""
    for name, m in lora_modules(model).items():
        m.weight.copy_((m.weight.float() + m.delta_weight()).to(m.weight.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, plain)
    return model


# --------------------------------------------------------------------------- the PEFT format


@dataclass(frozen=True)
class PeftNames:
    """How one family's module names read in Hugging Face's model, for PEFT keys and vLLM."""
    to_hf: Callable[[str], str]
    from_hf: Callable[[str], str]
    fan_in_fan_out: bool            # the HF projections store weights (in, out) (GPT-2's Conv1D)


def _same(name: str) -> str:
    return name


# Per model class. fastdpo's families keep transformers' module names (transformer.h.N.attn.c_attn
# for GPT-2, model.layers.N.self_attn.q_proj for the Llama family: fastdpo.models.hf_weights.to_hf_name);
# only GPT-2's projections are Conv1D there.
PEFT_NAMES: dict[str, PeftNames] = {"GPT": PeftNames(_same, _same, fan_in_fan_out=True),
                                    "Llama": PeftNames(_same, _same, fan_in_fan_out=False)}


def peft_names(model: nn.Module) -> PeftNames:
    family = type(model).__name__
    if family not in PEFT_NAMES:
        raise ValueError(f"no Hugging Face module names for {family} models: their adapters cannot be "
                         f"written in the PEFT format yet")
    return PEFT_NAMES[family]


def _peft_targets(model: nn.Module, adapted: Sequence[str], names: PeftNames) -> list[str]:
    """PEFT's ``target_modules``: leaf names when every module of those names is adapted, else the
    full names (PEFT matches a list entry against a module name or its dotted suffix)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    everyone = [n for n in _plain_linears(model) if n.rsplit(".", 1)[-1] in leaves]
    return leaves if sorted(everyone) == sorted(adapted) else sorted(names.to_hf(n) for n in adapted)


def save_adapter(directory: str | Path, model: nn.Module, base_model_name_or_path: str | None = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``."""
    directory = Path(directory)
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to save")
    names = peft_names(model)
    first = next(iter(mods.values()))
    if any((m.rank, m.alpha, m.rslora) != (first.rank, first.alpha, first.rslora) for m in mods.values()):
        raise ValueError("adapters of different rank or alpha cannot be written as one PEFT adapter")
    alpha = int(first.alpha) if float(first.alpha).is_integer() else first.alpha
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": first.rank, "lora_alpha": alpha, "lora_dropout": _dropout_p(first), "use_rslora": first.rslora,
        "target_modules": _peft_targets(model, list(mods), names), "fan_in_fan_out": names.fan_in_fan_out,
        "bias": "none", "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False,
    }
    tensors = {}
    for name, m in mods.items():
        key = PEFT_PREFIX + names.to_hf(name)
        tensors[f"{key}.lora_A.weight"] = m.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = m.lora_B.weight.detach().contiguous().cpu()
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _dropout_p(m: LoRALinear) -> float:
    return m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0


def read_adapter_config(directory: str | Path) -> dict:
    """A PEFT LoRA ``adapter_config.json``, checked for what fastdpo's adapters can represent."""
    file = Path(directory) / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
    except OSError as e:
        raise ValueError(f"{file}: cannot read ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: field 'peft_type' must be 'LORA'")
    for key, fine in (("r", lambda v: isinstance(v, int) and v > 0),
                      ("lora_alpha", lambda v: isinstance(v, (int, float)) and v > 0),
                      ("bias", lambda v: v in (None, "none")), ("use_dora", lambda v: not v),
                      ("modules_to_save", lambda v: not v), ("layers_to_transform", lambda v: v is None),
                      ("rank_pattern", lambda v: not v), ("alpha_pattern", lambda v: not v),
                      ("target_modules", lambda v: bool(v))):
        if not fine(config.get(key)):
            raise ValueError(f"{file}: field {key!r} = {config.get(key)!r} is not supported by fastdpo's "
                             f"LoRA")
    return config


def load_adapter(directory: str | Path, model: nn.Module) -> list[str]:
    """Put the PEFT adapter in ``directory`` onto ``model`` (adapters added, base frozen); returns
    the adapted module names."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    names = peft_names(model)
    targets = config["target_modules"]
    linears = list(_plain_linears(model))
    if isinstance(targets, str):       # PEFT: a string is a regular expression on the whole name
        chosen = [n for n in linears if re.fullmatch(targets, names.to_hf(n))]
    else:
        chosen = [n for n in linears if any(names.to_hf(n) == t or names.to_hf(n).endswith("." + t)
                                            for t in targets)]
    if not chosen:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: target_modules {targets!r} match no module of "
                         f"{type(model).__name__}")
    apply_lora(model, chosen, config["r"], float(config["lora_alpha"]),
               float(config.get("lora_dropout") or 0.0), bool(config.get("use_rslora")))
    load_adapter_weights(directory, model)
    return chosen


def load_adapter_weights(directory: str | Path, model: nn.Module) -> None:
    """Copy the adapter tensors in ``directory`` into ``model``'s existing adapters (every one of
    them must be there, with its shape)."""
    file = Path(directory) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(file)
    except Exception as e:   # safetensors raises its own error types for damaged files
        raise ValueError(f"{file}: missing, corrupt or truncated ({e})") from e
    names = peft_names(model)
    expected = {}
    for name, m in lora_modules(model).items():
        key = PEFT_PREFIX + names.to_hf(name)
        expected[f"{key}.lora_A.weight"] = m.lora_A.weight
        expected[f"{key}.lora_B.weight"] = m.lora_B.weight
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{file}: adapter tensors do not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        for key, p in expected.items():
            if tensors[key].shape != p.shape:
                raise ValueError(f"{file}: '{key}' has shape {tuple(tensors[key].shape)}, "
                                 f"expected {tuple(p.shape)}")
            p.copy_(tensors[key])


def is_adapter_dir(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / ADAPTER_CONFIG).is_file() and (d / ADAPTER_WEIGHTS).is_file()
