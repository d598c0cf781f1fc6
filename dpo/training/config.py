"""Training configuration: dataclasses, YAML loading and ``--set key=value`` overrides.

The names follow the seed's ``run_dpo`` API (``TrainingConfig``, ``DPOConfig``,
``PreferenceDatasetConfig``); a few seed fields that point at a model hub (``dataset_name``,
``tokenizer_name``) are read as local paths because fastdpo never downloads anything.

A YAML file holds one section per dataclass plus the top-level run inputs::

    sft_checkpoint: runs/sft/final     # the policy's starting point and the reference
    tokenizer: null                    # default: the tokenizer stored in the checkpoint
    train: {...}                       # TrainingConfig
    dpo: {...}                         # DPOConfig            (configs for ``fastdpo train``)
    data: {...}                        # PreferenceDatasetConfig
    sft: {...} / data: {...}           # SFTConfig / SFTDatasetConfig (``fastdpo sft``)
    health: {...}                      # HealthConfig: training alarms (both commands)

Unknown keys are errors naming the file and the key: a typo must never silently fall back to a
default and train something else than what the file says.

LLaMA-Factory's names (``pref_beta``, ``pref_loss``, ``cutoff_len`` ...; table ``ALIASES``) are
accepted too, inside their section or at the top level of a flat LLaMA-Factory-style file, where
every key that names one section's field goes to that section. This module is long because the
fields, their checks, the loader and the alias table have to agree, and one place keeps them so.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

# the loss types of fastdpo.training.losses (kept here: configs load without importing torch)
LOSS_TYPES = ("sigmoid", "sigmoid_norm", "robust", "hinge", "ipo", "ipo_sum", "apo_zero", "simpo", "orpo")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")                       # no reference model at all
LENGTH_NORMALISED_LOSSES = ("sigmoid_norm", "ipo", "simpo", "orpo")  # divide by answer token counts
SMOOTHED_LOSSES = ("sigmoid", "sigmoid_norm", "robust", "simpo")
REFERENCE_MODES = ("auto", "cached", "model", "none")
DATA_FORMATS = ("auto", "prompt", "implicit", "conversations", "hh")   # see fastdpo.training.data
SFT_FORMATS = ("auto", "prompt", "messages", "conversations")
# the kernel choices of fastdpo.training.logprobs (kept here: configs load without importing torch)
KERNELS = ("auto", "triton", "torch", "oracle")
REPORT_TO = ("wandb", "tensorboard", "none")


@dataclass
class TrainingConfig:
    """Optimization and bookkeeping shared by SFT and DPO."""
    run_name: str = "dpo"
    output_dir: Path = Path("runs")           # the run writes to output_dir / run_name
    batch_size: int | None = None             # pairs (DPO) or examples (SFT) per optimizer step
    micro_batch_size: int | None = None       # per forward; batch = micro * accumulation
    gradient_accumulation_steps: int | None = None
    learning_rate: float = 5e-6
    max_steps: int | None = None              # wins over epochs when set
    epochs: float = 1.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0                 # or warmup over this fraction of the steps
    min_lr_ratio: float = 0.0                 # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0                # 0 disables clipping (the norm is still logged)
    save_every: int = 0                       # 0: only at the end
    keep_checkpoints: int = 2                 # step checkpoints kept besides the final one (the
    #                                           newest is kept until the final one is written)
    log_every: int = 10
    eval_every: int = 0                       # 0: only at the end (when there is a val split)
    mixed_precision: str = "auto"             # "bf16" | "fp32" | "auto" (bf16 where supported)
    gradient_checkpointing: bool = False      # recompute each block's activations in backward
    finetuning_type: str = "full"             # full | lora (adapters train, the base is frozen)
    lora_target: str | list[str] = "all"      # "all" linear projections, or module names (c_attn, q_proj ...)
    lora_rank: int = 8
    lora_alpha: float | None = None           # default 2 x lora_rank
    lora_dropout: float = 0.0
    create_new_adapter: bool = False          # from a LoRA checkpoint: merge its adapter, train a new one
    lora_save_merged: bool = False            # final/ also holds the merged model.safetensors
    seed: int = 1337
    device: str = "auto"                      # "auto" | "cpu" | "cuda" | "cuda:1" ...
    kernel: str = "auto"                      # auto (Triton on CUDA, else torch) | triton | torch | oracle
    parallel: str = "ddp"                     # under torchrun: "ddp" (replicas) | "fsdp" (FSDP2 shards)
    # Where metrics go besides metrics.jsonl (always written), HF-style: wandb | tensorboard | none.
    # TensorBoard event files go to run_dir/tensorboard (needs the extra: pip install fastdpo[tensorboard]).
    report_to: list[str] = field(default_factory=lambda: ["wandb"])
    wandb: str = "auto"                       # "auto" (online with an API key, else offline) | ...
    wandb_project: str = "fastdpo"
    overwrite: bool = False                   # a fresh run may replace an existing run directory
    progress: bool = True                     # tqdm bar
    # Rows of similar length share a batch: sorted within windows of this many micro-batches.
    # 1 = plain shuffle (needed when length tracks content, as in the demo task).
    length_bucket: int = 64
    # Seed-API names kept for compatibility: local paths, no hub.
    dataset_name: str | None = None
    tokenizer_name: str | None = None

    def __post_init__(self):
        self.output_dir = Path(self.output_dir)
        self.adam_betas = tuple(self.adam_betas)
        _choice("mixed_precision", self.mixed_precision, ("bf16", "fp32", "auto"))
        _choice("TrainingConfig.kernel", self.kernel, KERNELS)
        _choice("parallel", self.parallel, ("ddp", "fsdp"))
        self._check_lora()
        _choice("wandb", self.wandb, ("auto", "disabled", "offline", "online"))
        self.report_to = ([self.report_to] if isinstance(self.report_to, str)
                          else ["none"] if self.report_to is None else list(self.report_to))
        for tracker in self.report_to:
            _choice("TrainingConfig.report_to entries", tracker, REPORT_TO)
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError(f"TrainingConfig.report_to: 'none' cannot be combined with {self.report_to}")
        for name in ("learning_rate", "epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainingConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainingConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_ratio and self.warmup_steps:
            raise ValueError("TrainingConfig: set warmup_steps or warmup_ratio, not both")
        if self.length_bucket < 1:
            raise ValueError(f"TrainingConfig.length_bucket must be >= 1, got {self.length_bucket}")
        for name in ("warmup_steps", "save_every", "log_every", "eval_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainingConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"TrainingConfig.max_steps must be > 0, got {self.max_steps}")
        self.batch_size, self.micro_batch_size, self.gradient_accumulation_steps = _resolve_batch(
            self.batch_size, self.micro_batch_size, self.gradient_accumulation_steps)

    def _check_lora(self):
        _choice("finetuning_type", self.finetuning_type, ("full", "lora"))
        targets = self.lora_target
        if isinstance(targets, str):   # LLaMA-Factory writes "q_proj,v_proj"
            targets = targets.split(",")
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"TrainingConfig.lora_target must be 'all' or a list of module names, "
                             f"got {targets!r}")
        self.lora_target = [t.strip() for t in targets if t.strip()]
        if not self.lora_target or ("all" in self.lora_target and len(self.lora_target) > 1):
            raise ValueError(f"TrainingConfig.lora_target must be 'all' or module names, "
                             f"got {self.lora_target}")
        if self.lora_rank < 1:
            raise ValueError(f"TrainingConfig.lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"TrainingConfig.lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"TrainingConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.finetuning_type == "lora" and self.parallel == "fsdp":
            raise ValueError("finetuning_type lora with parallel fsdp is not supported; use parallel: ddp")

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.run_name


def _resolve_batch(batch, micro, accum) -> tuple[int, int, int]:
    """batch = micro * accum; any two determine the third (nothing given: 32 x 1)."""
    for name, v in (("batch_size", batch), ("micro_batch_size", micro),
                    ("gradient_accumulation_steps", accum)):
        if v is not None and v <= 0:
            raise ValueError(f"TrainingConfig.{name} must be > 0, got {v}")
    if micro is not None and accum is not None:
        if batch is not None and batch != micro * accum:
            raise ValueError(f"TrainingConfig: batch_size {batch} != micro_batch_size {micro} x "
                             f"gradient_accumulation_steps {accum}")
        return micro * accum, micro, accum
    batch = 32 if batch is None else batch
    if micro is not None:
        accum, rem = divmod(batch, micro)
    elif accum is not None:
        micro, rem = divmod(batch, accum)
    else:
        micro, accum, rem = batch, 1, 0
    if rem or micro == 0 or accum == 0:
        raise ValueError(f"TrainingConfig: batch_size {batch} is not a multiple of "
                         f"{'micro_batch_size' if micro else 'gradient_accumulation_steps'}")
    return batch, micro, accum


@dataclass
class LengthLimits:
    """Sequence lengths as TRL names them, with one meaning in SFT and DPO (``batches.answer_room``):
    a prompt longer than ``max_prompt_length`` drops the example (never left-truncated: a prompt
    missing its start asks another question); an answer is cut on the right to
    ``max_completion_length`` and then to what ``max_length`` (prompt + answer, the total; also the
    model's context) leaves after the prompt. Dropped and cut examples are counted."""
    max_length: int = 1024                    # prompt + answer tokens (each answer, in DPO)
    max_prompt_length: int = 512              # longer prompts are dropped (and counted)
    max_completion_length: int | None = None  # answer tokens (None: whatever max_length leaves)

    def __post_init__(self):
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be > 0, got {v}")


@dataclass
class DPOConfig(LengthLimits):
    beta: float = 0.1
    loss_type: str = "sigmoid"                # one of LOSS_TYPES (formulas: fastdpo.training.losses)
    label_smoothing: float = 0.0              # the label-noise rate (sigmoid, sigmoid_norm, robust, simpo)
    simpo_gamma: float = 0.5                  # SimPO's target reward margin
    reference: str = "auto"                   # auto | cached | model | none (reference-free)
    reference_free: bool = False              # alias of reference: none
    reference_checkpoint: Path | None = None  # default: the SFT checkpoint
    reference_cache_dir: Path | None = None   # default: output_dir / "ref_cache"
    rpo_alpha: float = 0.0                    # weight of the mean per-token NLL on chosen answers
    shared_prompt: bool = True                # one row per pair, the prompt run once for both answers

    def __post_init__(self):
        super().__post_init__()
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        _choice("reference", self.reference, REFERENCE_MODES)
        if self.loss_type in REFERENCE_FREE_LOSSES:
            if self.reference not in ("auto", "none") or self.reference_checkpoint is not None:
                raise ValueError(f"DPOConfig.loss_type {self.loss_type!r} is reference-free: leave reference "
                                 f"at auto (or none) and reference_checkpoint unset")
            self.reference = "none"
        if self.reference_free:
            self.reference = "none"
        self.reference_free = self.reference == "none"
        if not self.beta > 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in SMOOTHED_LOSSES:
            raise ValueError(f"DPOConfig.label_smoothing applies to loss_type {list(SMOOTHED_LOSSES)} only, "
                             f"not {self.loss_type!r}")
        if not math.isfinite(self.simpo_gamma):
            raise ValueError(f"DPOConfig.simpo_gamma must be finite, got {self.simpo_gamma}")
        if self.rpo_alpha < 0:
            raise ValueError(f"DPOConfig.rpo_alpha must be >= 0, got {self.rpo_alpha}")
        for name in ("reference_checkpoint", "reference_cache_dir"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))


@dataclass
class _DatasetConfig:
    """Where a dataset's rows come from; the subclasses differ only in the row formats they accept."""
    FORMATS: ClassVar[tuple[str, ...]] = ()
    path: list[Path] = field(default_factory=list)   # JSONL / JSON-array files (or one path)
    format: str = "auto"                      # "auto" detects per file; else one of FORMATS
    val_size: float = 0.0                     # fraction (< 1) or number of rows held out
    on_error: str = "raise"                   # raise | skip (bad rows reported and counted)
    max_rows: int | None = None               # read at most this many good rows (quick runs)
    # Seed-API names: a local file, or a directory holding ``{split}.jsonl``.
    dataset_name: str | None = None
    split: str = "train"

    def __post_init__(self):
        _choice("format", self.format, self.FORMATS)
        _choice("on_error", self.on_error, ("raise", "skip"))
        self.path = _paths(self.path, self.dataset_name, self.split)
        _check_val_size(self.val_size)

    @property
    def paths(self) -> list[Path]:
        return self.path


@dataclass
class PreferenceDatasetConfig(_DatasetConfig):
    FORMATS: ClassVar[tuple[str, ...]] = DATA_FORMATS   # auto | prompt | implicit | conversations | hh


@dataclass
class SFTConfig(LengthLimits):
    """SFT's settings: the length limits (same meaning as DPO's), and the vocabulary of the BPE
    tokenizer trained on the data when a fresh model is given no tokenizer."""
    tokenizer_vocab_size: int = 2048

    def __post_init__(self):
        super().__post_init__()
        if self.tokenizer_vocab_size < 256 + 8:
            raise ValueError(f"SFTConfig.tokenizer_vocab_size must be >= 264 (the 256 bytes and the "
                             f"special tokens), got {self.tokenizer_vocab_size}")


@dataclass
class SFTDatasetConfig(_DatasetConfig):
    FORMATS: ClassVar[tuple[str, ...]] = SFT_FORMATS    # auto | prompt | messages | conversations


@dataclass
class HealthConfig:
    """Alarms during training, each a console warning and a metrics.jsonl row (split "alarm");
    see ``fastdpo.training.health``. The defaults flag clear trouble, not ordinary DPO drift."""
    enabled: bool = True
    # -- on the logged training metrics
    displacement_per_token: float = 0.5   # chosen answers' NLL per token rose this much above its first
    #                                       logged value while the reward margin grew
    max_margin: float = 10.0              # rewards/margins above this: saturated, log-probs being destroyed
    grad_norm_spike: float = 10.0         # grad norm above this multiple of the median of earlier logs
    # -- on answers to held-out prompts at each evaluation, against the reference model's (step 0)
    prompts: Path | None = None           # JSONL with a "prompt" field; default: the val split's prompts
    n_prompts: int = 32                   # 0 turns the held-out answers off
    max_new_tokens: int = 64
    temperature: float = 0.0              # 0: greedy (no sampling noise between evaluations)
    judge: str | None = None              # a judge name ("task", module:fn) scoring the held-out answers
    length_drift: float = 0.5             # mean answer length off the reference's by more than this fraction
    repetition_rise: float = 0.15         # repeated-4-gram fraction above the reference's by more than this
    distinct_drop: float = 0.5            # distinct-2 below (1 - this) x the reference's
    hacking_drop: float = 0.1             # held-out score (judge) or val preference accuracy this fraction
    #                                       below its best while the training reward keeps rising

    def __post_init__(self):
        if self.prompts is not None:
            self.prompts = Path(self.prompts)
        for name in ("displacement_per_token", "max_margin", "grad_norm_spike", "length_drift",
                     "repetition_rise", "distinct_drop", "hacking_drop", "temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"HealthConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("n_prompts", "max_new_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"HealthConfig.{name} must be >= 0, got {getattr(self, name)}")


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_val_size(v):
    if v < 0 or (v >= 1 and v != int(v)):
        raise ValueError(f"val_size must be a fraction in [0, 1) or a whole number of rows, got {v}")


def _paths(path, dataset_name, split) -> list[Path]:
    paths = [path] if isinstance(path, (str, Path)) else list(path or [])
    if dataset_name:
        p = Path(dataset_name)
        if p.is_dir():
            hits = [p / f"{split}{ext}" for ext in (".jsonl", ".json") if (p / f"{split}{ext}").is_file()]
            if not hits:
                raise ValueError(f"dataset_name {dataset_name!r}: no {split}.jsonl or {split}.json in it")
            p = hits[0]
        elif not p.is_file():
            raise ValueError(f"dataset_name {dataset_name!r} is not a local file or directory "
                             f"(fastdpo reads local JSONL; it does not download datasets)")
        paths.append(p)
    return [Path(p) for p in paths]


# --------------------------------------------------------------------------- YAML + overrides

SECTIONS = {
    "dpo": {"train": TrainingConfig, "dpo": DPOConfig, "data": PreferenceDatasetConfig,
            "health": HealthConfig},
    "sft": {"train": TrainingConfig, "sft": SFTConfig, "data": SFTDatasetConfig,
            "health": HealthConfig},
}
# generation: a mapping passed through as is, for the commands that sample from the policy while
# they train (fastdpo loop); fastdpo.generation.backends.GenerationConfig checks it there
TOP_LEVEL = {"dpo": ("sft_checkpoint", "tokenizer", "generation"),
             "sft": ("init_checkpoint", "model", "tokenizer")}


# LLaMA-Factory's names -> fastdpo's "section.field" (or a top-level key). "{task}" is the dpo or
# sft section, "{checkpoint}" the top-level starting checkpoint. Names LLaMA-Factory shares with
# fastdpo (learning_rate, warmup_ratio, gradient_checkpointing, finetuning_type, lora_rank,
# lora_alpha, lora_target, lora_dropout, create_new_adapter, val_size, ...) need no entry.
ALIASES = {
    "model_name_or_path": "{checkpoint}",
    "ref_model": "dpo.reference_checkpoint",
    "pref_beta": "dpo.beta",
    "pref_loss": "dpo.loss_type",
    "cutoff_len": "{task}.max_length",
    "per_device_train_batch_size": "train.micro_batch_size",
    "num_train_epochs": "train.epochs",
    "logging_steps": "train.log_every",
    "save_steps": "train.save_every",
    "eval_steps": "train.eval_every",
    "overwrite_output_dir": "train.overwrite",
    "max_samples": "data.max_rows",
}
# Flat-file keys whose value is translated (or only checked); see _llamafactory_key.
LLAMAFACTORY_KEYS = ("stage", "do_train", "dataset", "dataset_dir", "template", "fp16", "bf16",
                     "lr_scheduler_type", "eval_strategy", "evaluation_strategy", "output_dir")


def _alias_target(key: str, kind: str) -> str | None:
    target = ALIASES.get(key)
    if target is None:
        return None
    return target.format(task=kind, checkpoint=TOP_LEVEL[kind][0])


def _owners(key: str, kind: str) -> list[str]:
    """The sections of a ``kind`` config that have a field ``key``."""
    return [s for s, cls in SECTIONS[kind].items() if key in {f.name for f in dataclasses.fields(cls)}]


def translate_aliases(raw: dict, kind: str, source: str) -> dict:
    """``raw`` with LLaMA-Factory's names and flat layout turned into fastdpo's sections."""
    sections, top = SECTIONS[kind], TOP_LEVEL[kind]
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items() if k in sections or k in top}

    def put(target: str, value, key: str) -> None:
        section, _, name = target.partition(".")
        node = out if not name else out.setdefault(section, {})
        name = name or section
        if not isinstance(node, dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping")
        if name in node:
            raise ValueError(f"{source}: {key!r} sets {target}, which is set already")
        node[name] = value

    for section in sections:           # aliases inside a section
        node = out.get(section)
        for key in list(node) if isinstance(node, dict) else ():
            target = _alias_target(key, kind)
            if target and target.startswith(section + "."):
                put(target, node.pop(key), f"{section}.{key}")
    for key, value in raw.items():     # a flat file's top-level keys
        if key in sections or key in top:
            continue
        if key in LLAMAFACTORY_KEYS:
            for target, v in _llamafactory_key(key, value, kind, raw, source):
                put(target, v, key)
            continue
        owners = _owners(key, kind)
        target = _alias_target(key, kind) or (f"{owners[0]}.{key}" if len(owners) == 1 else None)
        if target is None:
            raise ValueError(f"{source}: unknown key {key!r} (top-level keys: {sorted([*sections, *top])}, "
                             f"a field of one section, or a LLaMA-Factory name)")
        put(target, value, key)
    return out


def _llamafactory_key(key: str, value, kind: str, raw: dict, source: str) -> list[tuple[str, object]]:
    """The fastdpo settings one of LLAMAFACTORY_KEYS stands for (an empty list: only checked)."""
    where = f"{source}: {key}"
    if key == "stage" and value != kind:
        raise ValueError(f"{where}: {value!r}, but this command trains stage {kind!r}")
    if key == "do_train" and value is not True:
        raise ValueError(f"{where}: must be true (fastdpo train and fastdpo sft train)")
    if key == "dataset":
        return [("data.path", _llamafactory_datasets(value, raw.get("dataset_dir") or "data", where))]
    if key in ("fp16", "bf16") and value:
        # fastdpo's half precision is bf16 (no fp16 loss scaling): "auto" takes it where supported
        return [("train.mixed_precision", "bf16" if key == "bf16" else "auto")]
    if key == "lr_scheduler_type" and value != "cosine":
        raise ValueError(f"{where}: {value!r}; fastdpo's schedule is warmup then cosine")
    if key in ("eval_strategy", "evaluation_strategy"):
        if value not in ("steps", "no"):
            raise ValueError(f"{where}: {value!r}; fastdpo evaluates every eval_steps steps ('steps') or "
                             f"only at the end ('no')")
        return [("train.eval_every", 0)] if value == "no" else []
    if key == "output_dir":   # LLaMA-Factory's output_dir is the run's own directory
        path = Path(value)
        return [("train.output_dir", str(path.parent)), ("train.run_name", path.name)]
    return []   # stage/do_train as expected; dataset_dir (read with dataset); template: prompts are
    #             rendered with the checkpoint tokenizer's own chat template


def _llamafactory_datasets(names, dataset_dir: str, where: str) -> list[str]:
    """LLaMA-Factory dataset names -> local files: ``dataset_dir/dataset_info.json``'s ``file_name``
    for a registered name, else the name as a path (in ``dataset_dir`` or as given)."""
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names or [])
    info_file = Path(dataset_dir) / "dataset_info.json"
    info = {}
    if info_file.is_file():
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{info_file}:{e.lineno}: invalid JSON ({e.msg})") from e
    paths = []
    for name in names:
        entry = info.get(name) if isinstance(info, dict) else None
        if isinstance(entry, dict) and entry.get("file_name"):
            paths.append(str(Path(dataset_dir) / entry["file_name"]))
        elif Path(dataset_dir, name).is_file() or Path(name).is_file():
            paths.append(str(Path(dataset_dir, name) if Path(dataset_dir, name).is_file() else Path(name)))
        else:
            raise ValueError(f"{where}: {name!r} is neither a file_name entry of {info_file} nor a local "
                             f"file (fastdpo reads local JSONL; it does not download datasets)")
    return paths


def read_yaml(path: str | Path) -> tuple[dict, str]:
    """A YAML mapping and the file it came from. A name that is not a file here but is one of the
    configs fastdpo ships (``dpo.yaml``, ``sft.yaml``, ``configs/demo.yaml`` ...) is read from the
    installed package, so the documented commands work from any directory."""
    path = Path(path)
    if not path.is_file():
        from fastdpo.configs import config_path
        try:
            path = config_path(path.name) if path.parent in (Path("."), Path("configs")) else path
        except FileNotFoundError:
            pass
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return raw, str(path)


def load_config(path: str | Path | None, overrides: list[str] = (), kind: str = "dpo") -> dict:
    """Read a YAML config (or none) plus ``section.key=value`` overrides into config objects.

    Returns ``{"train": TrainingConfig, "dpo"/"sft": ..., "data": ..., <top-level keys>}``.
    Relative paths in the file are taken relative to the current directory, like the CLI's.
    """
    raw, source = read_yaml(path) if path else ({}, "<defaults>")
    raw = translate_aliases(raw, kind, source)   # so that overrides replace what the file says
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None, kind)
    return build_configs(raw, kind, source)


def _set_dotted(raw: dict, key: str, value, kind: str) -> None:
    """``beta=0.2`` finds the one section with a field ``beta``; ``train.seed=1`` is explicit."""
    if "." not in key and _alias_target(key, kind):
        key = _alias_target(key, kind)   # --set pref_beta=0.2 is --set dpo.beta=0.2
    if "." not in key and key not in TOP_LEVEL[kind]:
        owners = _owners(key, kind)
        if len(owners) != 1:
            where = "no section" if not owners else f"sections {owners}"
            raise ValueError(f"--set {key}: {where} of a {kind} config has that key; write section.key")
        key = f"{owners[0]}.{key}"
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {p!r} is not a section")
    node[leaf] = value


def build_configs(raw: dict, kind: str, source: str = "<dict>") -> dict:
    raw = translate_aliases(raw, kind, source)
    out: dict = {k: raw.get(k) for k in TOP_LEVEL[kind]}
    for section, cls in SECTIONS[kind].items():
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping")
        out[section] = from_dict(cls, values, f"{source}: {section}")
    return out


def from_dict(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} for {cls.__name__}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def _coerce(value, hint, where):
    """YAML gives ints for ``1`` and strings for ``1e-6``; fields get the type they declare."""
    if value is None:
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return _coerce(value, args[0], where)
    try:
        if hint is float:
            f = float(value)
            if math.isnan(f):
                raise ValueError
            return f
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and value != int(value)):
                raise ValueError
            return int(value)
        if hint is bool and not isinstance(value, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


def to_dict(cfg) -> dict:
    """A JSON-able dict of a config dataclass (for W&B, metrics and checkpoint metadata)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, (list, tuple)):
            v = [str(x) if isinstance(x, Path) else x for x in v]
        out[f.name] = v
    return out
