"""The demo recipe (``configs/demo.yaml``): one dataclass per section, read by the same loader as
the training configs (``fastdpo.training.config.from_dict``), so a typo or a wrong type is an
error naming the file, the section and the key, as everywhere else."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from fastdpo.configs import config_path
from fastdpo.demo.task import TaskConfig
from fastdpo.training.config import from_dict, read_yaml

DEFAULT_CONFIG = config_path("demo.yaml")
ARM_KINDS = ("sft_chosen", "dpo")          # an arm is SFT on chosen answers, or a DPO run


@dataclass
class TrainSection:
    """One training run of the demo (SFT, or an arm): ``steps`` wins over ``epochs``."""
    batch_size: int
    learning_rate: float
    steps: int | None = None
    epochs: float = 1.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    log_every: int = 10
    length_bucket: int = 1


@dataclass
class ArmSection(TrainSection):
    kind: str = "dpo"                       # sft_chosen | dpo
    beta: float = 0.1
    loss_type: str = "sigmoid"
    rpo_alpha: float = 0.0

    def __post_init__(self):
        if self.kind not in ARM_KINDS:
            raise ValueError(f"kind must be one of {list(ARM_KINDS)}, got {self.kind!r}")


@dataclass
class MineSection:
    temps: list[float]
    max_new_tokens: int
    batch_size: int
    top_k: int = 0                          # 0: the full distribution
    min_gap: int = 2
    min_best: int = 6
    min_pairs: int = 1                      # fewer mined pairs is an error...
    top_up_with_reference: bool = False     # ...unless topped up with reference pairs (smoke runs)


@dataclass
class EvalSection:
    temperature: float
    max_new_tokens: int
    batch_size: int
    top_k: int = 0


@dataclass
class TokenizerSection:
    vocab_size: int = 512


@dataclass
class DemoConfig:
    task: dict
    tokenizer: dict
    model: dict                             # a preset name plus GPTConfig overrides
    sft: dict
    mine: dict
    arms: dict
    eval: dict
    headline: str
    seed: int = 0
    threads: int | str = 1                  # a number, or "auto"
    mixed_precision: str = "auto"
    wandb: str = "offline"
    quick: dict = field(default_factory=dict)


SECTIONS = {"task": TaskConfig, "tokenizer": TokenizerSection, "sft": TrainSection, "mine": MineSection,
            "eval": EvalSection}


def load_demo_config(config: str | Path | dict | None = None, quick: bool = False) -> dict:
    """The demo recipe as a plain dict, validated: a YAML path, a dict, or None (the installed
    ``demo.yaml``). ``quick`` merges the file's ``quick:`` section over it (tiny sizes for CI)."""
    if config is None:
        config = DEFAULT_CONFIG
    if isinstance(config, dict):
        raw, source = copy.deepcopy(config), "<dict>"
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a mapping at the top level")
    else:
        raw, source = read_yaml(config)
    quick_over = raw.pop("quick", None) or {}
    if quick:
        raw = _merge(raw, quick_over, f"{source}: quick")
    for section in ("task", "tokenizer", "model", "sft", "mine", "arms", "eval"):
        if not isinstance(raw.get(section), dict):
            raise ValueError(f"{source}: section {section!r} is missing or not a mapping")
    top = from_dict(DemoConfig, raw, source)
    out = dataclasses.asdict(top)
    out.pop("quick")
    for section, cls in SECTIONS.items():
        out[section] = dataclasses.asdict(from_dict(cls, raw[section], f"{source}: {section}"))
    out["task"]["families"] = list(out["task"]["families"])
    out["arms"] = {name: dataclasses.asdict(from_dict(ArmSection, arm if isinstance(arm, dict) else {},
                                                      f"{source}: arms.{name}"))
                   for name, arm in raw["arms"].items()}
    if top.headline not in out["arms"]:
        raise ValueError(f"{source}: headline {top.headline!r} is not one of the arms {sorted(out['arms'])}")
    return out


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{where}.{k}")
        else:
            out[k] = copy.deepcopy(v)
    return out
