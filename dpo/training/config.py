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
import re
from dataclasses import field
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import AfterValidator, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import is_pydantic_dataclass

from fastdpo.errors import ConfigError
from fastdpo.models.schema import (
    Bool,
    Float,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_class,
    schema_error,
)

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
Beta = Annotated[Float, Field(ge=0, lt=1)]   # an Adam beta
Threshold = NonNegativeFloat                  # a health alarm's level


def _device_name(value: str) -> str:
    """A device name (whether this machine has it is ``runtime.resolve_device``'s to say)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ValueError("must be auto, cpu, cuda or cuda:N")
    return value


@config_class
class TrainingConfig:
    """Optimization and bookkeeping shared by SFT and DPO."""
    run_name: str = "dpo"
    output_dir: Path = Path("runs")           # the run writes to output_dir / run_name
    batch_size: PositiveInt | None = None     # pairs (DPO) or examples (SFT) per optimizer step
    micro_batch_size: PositiveInt | None = None   # per forward; batch = micro * accumulation
    gradient_accumulation_steps: PositiveInt | None = None
    learning_rate: PositiveFloat = 5e-6
    max_steps: PositiveInt | None = None      # wins over epochs when set
    epochs: PositiveFloat = 1.0
    warmup_steps: NonNegativeInt = 0
    warmup_ratio: Fraction = 0.0              # or warmup over this fraction of the steps
    min_lr_ratio: Annotated[Float, Field(ge=0, le=1)] = 0.0   # cosine decays to learning_rate * this
    weight_decay: NonNegativeFloat = 0.0
    adam_betas: tuple[Beta, Beta] = (0.9, 0.95)
    max_grad_norm: NonNegativeFloat = 1.0     # 0 disables clipping (the norm is still logged)
    save_every: NonNegativeInt = 0            # 0: only at the end
    keep_checkpoints: NonNegativeInt = 2      # step checkpoints kept besides the final one (the
    #                                           newest is kept until the final one is written)
    log_every: NonNegativeInt = 10
    eval_every: NonNegativeInt = 0            # 0: only at the end (when there is a val split)
    mixed_precision: Literal["bf16", "fp32", "auto"] = "auto"   # auto: bf16 where supported
    gradient_checkpointing: Bool = False      # recompute each block's activations in backward
    finetuning_type: Literal["full", "lora"] = "full"   # lora: adapters train, the base is frozen
    lora_target: str | list[str] = "all"      # "all" linear projections, or module names (c_attn, q_proj ...)
    lora_rank: PositiveInt = 8
    lora_alpha: PositiveFloat | None = None   # default 2 x lora_rank
    lora_dropout: Fraction = 0.0
    create_new_adapter: Bool = False          # from a LoRA checkpoint: merge its adapter, train a new one
    lora_save_merged: Bool = False            # final/ also holds the merged model.safetensors
    seed: NonNegativeInt = 1337
    # "auto" | "cpu" | "cuda" | "cuda:1" ... (whether this machine has it is checked at the start)
    device: Annotated[str, AfterValidator(_device_name)] = "auto"
    kernel: Literal[KERNELS] = "auto"         # auto (Triton on CUDA, else torch) | triton | torch | oracle
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: ddp (replicas) | fsdp (FSDP2 shards)
    # Where metrics go besides metrics.jsonl (always written), HF-style: wandb | tensorboard | none.
    # TensorBoard event files go to run_dir/tensorboard (needs the extra: pip install fastdpo[tensorboard]).
    report_to: list[Literal[REPORT_TO]] | Literal[REPORT_TO] | None = field(default_factory=lambda: ["wandb"])
    wandb: Literal["auto", "disabled", "offline", "online"] = "auto"   # auto: online with an API key
    wandb_project: str = "fastdpo"
    overwrite: Bool = False                   # a fresh run may replace an existing run directory
    progress: Bool = True                     # tqdm bar
    # Rows of similar length share a batch: sorted within windows of this many micro-batches.
    # 1 = plain shuffle (needed when length tracks content, as in the demo task).
    length_bucket: PositiveInt = 64
    # Seed-API names kept for compatibility: local paths, no hub.
    dataset_name: str | None = None
    tokenizer_name: str | None = None

    def __post_init__(self):
        # types, ranges and choices are the annotations' (fastdpo.models.schema); what follows
        # relates fields to each other
        self.output_dir = Path(self.output_dir)
        self._check_lora()
        self.report_to = ([self.report_to] if isinstance(self.report_to, str)
                          else ["none"] if self.report_to is None else list(self.report_to))
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ConfigError(f"TrainingConfig.report_to: 'none' cannot be combined with {self.report_to}")
        if self.warmup_ratio and self.warmup_steps:
            raise ConfigError("TrainingConfig: set warmup_steps or warmup_ratio, not both")
        self.batch_size, self.micro_batch_size, self.gradient_accumulation_steps = _resolve_batch(
            self.batch_size, self.micro_batch_size, self.gradient_accumulation_steps)

    def _check_lora(self):
        targets = self.lora_target
        if isinstance(targets, str):   # LLaMA-Factory writes "q_proj,v_proj"
            targets = targets.split(",")
        self.lora_target = [t.strip() for t in targets if t.strip()]
        if not self.lora_target or ("all" in self.lora_target and len(self.lora_target) > 1):
            raise ConfigError(f"TrainingConfig.lora_target must be 'all' or module names, "
                              f"got {self.lora_target}")
        if self.finetuning_type == "lora" and self.parallel == "fsdp":
            raise ConfigError("finetuning_type lora with parallel fsdp is not supported; use parallel: ddp")

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.run_name


def _resolve_batch(batch, micro, accum) -> tuple[int, int, int]:
    """batch = micro * accum; any two determine the third (nothing given: 32 x 1)."""
    if micro is not None and accum is not None:
        if batch is not None and batch != micro * accum:
            raise ConfigError(f"TrainingConfig: batch_size {batch} != micro_batch_size {micro} x "
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
        raise ConfigError(f"TrainingConfig: batch_size {batch} is not a multiple of "
                         f"{'micro_batch_size' if micro else 'gradient_accumulation_steps'}")
    return batch, micro, accum


@config_class
class LengthLimits:
    """Sequence lengths as TRL names them, with one meaning in SFT and DPO (``batches.answer_room``):
    a prompt longer than ``max_prompt_length`` drops the example (never left-truncated: a prompt
    missing its start asks another question); an answer is cut on the right to
    ``max_completion_length`` and then to what ``max_length`` (prompt + answer, the total; also the
    model's context) leaves after the prompt. Dropped and cut examples are counted."""
    max_length: PositiveInt = 1024            # prompt + answer tokens (each answer, in DPO)
    max_prompt_length: PositiveInt = 512      # longer prompts are dropped (and counted)
    max_completion_length: PositiveInt | None = None   # answer tokens (None: whatever max_length leaves)

    def __post_init__(self):
        pass


@config_class
class DPOConfig(LengthLimits):
    beta: PositiveFloat = 0.1
    loss_type: Literal[LOSS_TYPES] = "sigmoid"   # formulas: fastdpo.training.losses
    label_smoothing: Annotated[Float, Field(ge=0, lt=0.5)] = 0.0   # the label-noise rate (sigmoid,
    #                                           sigmoid_norm, robust, simpo)
    simpo_gamma: Float = 0.5                  # SimPO's target reward margin
    reference: Literal[REFERENCE_MODES] = "auto"   # auto | cached | model | none (reference-free)
    reference_free: Bool = False              # alias of reference: none
    reference_checkpoint: Path | None = None  # default: the SFT checkpoint
    reference_cache_dir: Path | None = None   # default: output_dir / "ref_cache"
    rpo_alpha: NonNegativeFloat = 0.0         # weight of the mean per-token NLL on chosen answers
    shared_prompt: Bool = True                # one row per pair, the prompt run once for both answers
    margin_weighting: Bool = False            # weight each pair's loss by its preference margin
    dimension_weights: dict[str, NonNegativeFloat] | None = None   # rows' "dimensions" in that margin
    #                                           (default: equal)

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type in REFERENCE_FREE_LOSSES:
            if self.reference not in ("auto", "none") or self.reference_checkpoint is not None:
                raise ConfigError(f"DPOConfig.loss_type {self.loss_type!r} is reference-free: leave "
                                  f"reference at auto (or none) and reference_checkpoint unset")
            self.reference = "none"
        if self.reference_free:
            self.reference = "none"
        self.reference_free = self.reference == "none"
        if self.label_smoothing and self.loss_type not in SMOOTHED_LOSSES:
            raise ConfigError(f"DPOConfig.label_smoothing applies to loss_type {list(SMOOTHED_LOSSES)} only, "
                              f"not {self.loss_type!r}")


@config_class
class _DatasetConfig:
    """Where a dataset's rows come from; the subclasses differ only in the row formats they accept."""
    FORMATS: ClassVar[tuple[str, ...]] = ()
    path: list[Path] | Path = field(default_factory=list)   # JSONL / JSON-array files (or one path)
    format: str = "auto"                      # "auto" detects per file; else one of FORMATS
    val_size: NonNegativeFloat = 0.0          # fraction (< 1) or number of rows held out
    on_error: Literal["raise", "skip"] = "raise"   # skip: bad rows reported and counted
    max_rows: PositiveInt | None = None       # read at most this many good rows (quick runs)
    # Seed-API names: a local file, or a directory holding ``{split}.jsonl``.
    dataset_name: str | None = None
    split: str = "train"

    def __post_init__(self):
        _choice(f"{type(self).__name__}.format", self.format, self.FORMATS)   # FORMATS: per subclass
        self.path = _paths(self.path, self.dataset_name, self.split)
        _check_val_size(self.val_size)

    @property
    def paths(self) -> list[Path]:
        return self.path


@config_class
class PreferenceDatasetConfig(_DatasetConfig):
    FORMATS: ClassVar[tuple[str, ...]] = DATA_FORMATS   # auto | prompt | implicit | conversations | hh


@config_class
class SFTConfig(LengthLimits):
    """SFT's settings: the length limits (same meaning as DPO's), and the vocabulary of the BPE
    tokenizer trained on the data when a fresh model is given no tokenizer."""
    tokenizer_vocab_size: Annotated[int, Field(ge=256 + 8)] = 2048   # the 256 bytes and the special tokens


@config_class
class SFTDatasetConfig(_DatasetConfig):
    FORMATS: ClassVar[tuple[str, ...]] = SFT_FORMATS    # auto | prompt | messages | conversations


@config_class
class HealthConfig:
    """Alarms during training, each a console warning and a metrics.jsonl row (split "alarm");
    see ``fastdpo.training.health``. The defaults flag clear trouble, not ordinary DPO drift."""
    enabled: Bool = True
    # -- on the logged training metrics
    displacement_per_token: Threshold = 0.5   # chosen answers' NLL per token rose this much above its
    #                                           first logged value while the reward margin grew
    max_margin: Threshold = 10.0          # rewards/margins above this: saturated, log-probs being destroyed
    grad_norm_spike: Threshold = 10.0     # grad norm above this multiple of the median of earlier logs
    # -- on answers to held-out prompts at each evaluation, against the reference model's (step 0)
    prompts: Path | None = None           # JSONL with a "prompt" field; default: the val split's prompts
    n_prompts: NonNegativeInt = 32        # 0 turns the held-out answers off
    max_new_tokens: NonNegativeInt = 64
    temperature: Threshold = 0.0          # 0: greedy (no sampling noise between evaluations)
    judge: str | None = None              # a judge name ("task", module:fn) scoring the held-out answers
    length_drift: Threshold = 0.5         # mean answer length off the reference's by more than this fraction
    repetition_rise: Threshold = 0.15     # repeated-4-gram fraction above the reference's by more than this
    distinct_drop: Threshold = 0.5        # distinct-2 below (1 - this) x the reference's
    hacking_drop: Threshold = 0.1         # held-out score (judge) or val preference accuracy this fraction
    #                                       below its best while the training reward keeps rising

    def __post_init__(self):
        if self.prompts is not None:
            self.prompts = Path(self.prompts)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_val_size(v):
    if v < 0 or (v >= 1 and v != int(v)):
        raise ConfigError(f"val_size must be a fraction in [0, 1) or a whole number of rows, got {v}")


def _paths(path, dataset_name, split) -> list[Path]:
    paths = [path] if isinstance(path, (str, Path)) else list(path or [])
    if dataset_name:
        p = Path(dataset_name)
        if p.is_dir():
            hits = [p / f"{split}{ext}" for ext in (".jsonl", ".json") if (p / f"{split}{ext}").is_file()]
            if not hits:
                raise ConfigError(f"dataset_name {dataset_name!r}: no {split}.jsonl or {split}.json in it")
            p = hits[0]
        elif not p.is_file():
            raise ConfigError(f"dataset_name {dataset_name!r} is not a local file or directory "
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
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        if name in node:
            raise ConfigError(f"{source}: {key!r} sets {target}, which is set already")
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
            raise ConfigError(f"{source}: unknown key {key!r} (top-level keys: {sorted([*sections, *top])}, "
                             f"a field of one section, or a LLaMA-Factory name)")
        put(target, value, key)
    return out


def _llamafactory_key(key: str, value, kind: str, raw: dict, source: str) -> list[tuple[str, object]]:
    """The fastdpo settings one of LLAMAFACTORY_KEYS stands for (an empty list: only checked)."""
    where = f"{source}: {key}"
    if key == "stage" and value != kind:
        raise ConfigError(f"{where}: {value!r}, but this command trains stage {kind!r}")
    if key == "do_train" and value is not True:
        raise ConfigError(f"{where}: must be true (fastdpo train and fastdpo sft train)")
    if key == "dataset":
        return [("data.path", _llamafactory_datasets(value, raw.get("dataset_dir") or "data", where))]
    if key in ("fp16", "bf16") and value:
        # fastdpo's half precision is bf16 (no fp16 loss scaling): "auto" takes it where supported
        return [("train.mixed_precision", "bf16" if key == "bf16" else "auto")]
    if key == "lr_scheduler_type" and value != "cosine":
        raise ConfigError(f"{where}: {value!r}; fastdpo's schedule is warmup then cosine")
    if key in ("eval_strategy", "evaluation_strategy"):
        if value not in ("steps", "no"):
            raise ConfigError(f"{where}: {value!r}; fastdpo evaluates every eval_steps steps ('steps') or "
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
            raise ConfigError(f"{info_file}:{e.lineno}: invalid JSON ({e.msg})") from e
    paths = []
    for name in names:
        entry = info.get(name) if isinstance(info, dict) else None
        if isinstance(entry, dict) and entry.get("file_name"):
            paths.append(str(Path(dataset_dir) / entry["file_name"]))
        elif Path(dataset_dir, name).is_file() or Path(name).is_file():
            paths.append(str(Path(dataset_dir, name) if Path(dataset_dir, name).is_file() else Path(name)))
        else:
            raise ConfigError(f"{where}: {name!r} is neither a file_name entry of {info_file} nor a local "
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
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', None) or e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw, str(path)


def key_lines(path: str | Path) -> dict[str, int]:
    """The line of each top-level key and each key of a top-level section (``"train.seed"``) of a
    YAML file that ``read_yaml`` has read, so a bad value can be pointed at."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    out = {}
    for k, v in node.value if isinstance(node, yaml.MappingNode) else ():
        out[str(k.value)] = k.start_mark.line + 1
        for k2, _ in v.value if isinstance(v, yaml.MappingNode) else ():
            out[f"{k.value}.{k2.value}"] = k2.start_mark.line + 1
    return out


def load_config(path: str | Path | None, overrides: list[str] = (), kind: str = "dpo") -> dict:
    """Read a YAML config (or none) plus ``section.key=value`` overrides into config objects.

    Returns ``{"train": TrainingConfig, "dpo"/"sft": ..., "data": ..., <top-level keys>}``.
    Relative paths in the file are taken relative to the current directory, like the CLI's.
    A bad value is a ``ConfigError`` naming the file and line it came from (or ``--set``) and the key.
    """
    raw, source = read_yaml(path) if path else ({}, "<defaults>")
    origins = {k: f"{source}:{line}" for k, line in key_lines(source).items()} if path else {}
    raw = translate_aliases(raw, kind, source)   # so that overrides replace what the file says
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: cannot parse the value as YAML "
                              f"({getattr(e, 'problem', None) or e})") from None
        origins[_set_dotted(raw, key.strip(), parsed, kind)] = "--set"
    return build_configs(raw, kind, source, origins)


def _set_dotted(raw: dict, key: str, value, kind: str) -> str:
    """``beta=0.2`` finds the one section with a field ``beta``; ``train.seed=1`` is explicit.
    Returns the key as ``section.field``."""
    if "." not in key and _alias_target(key, kind):
        key = _alias_target(key, kind)   # --set pref_beta=0.2 is --set dpo.beta=0.2
    if "." not in key and key not in TOP_LEVEL[kind]:
        owners = _owners(key, kind)
        if len(owners) != 1:
            where = "no section" if not owners else f"sections {owners}"
            raise ConfigError(f"--set {key}: {where} of a {kind} config has that key; write section.key")
        key = f"{owners[0]}.{key}"
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p!r} is not a section")
    node[leaf] = value
    return key


def build_configs(raw: dict, kind: str, source: str = "<dict>", origins: dict | None = None) -> dict:
    """Config objects from a mapping of sections; ``origins`` maps ``section.key`` (or a flat
    file's ``key``) to where its value came from (``file:line``, ``--set``), for error messages."""
    raw = translate_aliases(raw, kind, source)
    origins = origins or {}
    out: dict = {k: raw.get(k) for k in TOP_LEVEL[kind]}
    for section, cls in SECTIONS[kind].items():
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")

        def origin(name, section=section):
            aliases = [k for k, t in ALIASES.items() if _alias_target(k, kind) == f"{section}.{name}"]
            for key in (f"{section}.{name}", name, *aliases, *(f"{section}.{a}" for a in aliases)):
                if key in origins:
                    return origins[key]
            return source

        out[section] = from_dict(cls, values, f"{source}: {section}", origin, section)
    return out


def from_dict(cls, values: dict, where: str, origin=None, section: str | None = None):
    """``cls(**values)`` validated by its schema (a ``config_class``, or a plain dataclass checked
    the same way); an unknown key or a bad value is a ``ConfigError`` naming where it came from."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} for {cls.__name__}")
    try:
        if is_pydantic_dataclass(cls):
            return cls(**values)
        try:
            return TypeAdapter(cls).validate_python(values)
        except ValidationError as e:
            raise schema_error(cls.__name__, e) from None
    except ConfigError as e:
        name = getattr(e, "field_name", None)
        if name is None:   # a rule between fields: the section is where to look
            raise ConfigError(f"{where}: {e}") from None
        field_name = f"{section}.{name}" if section else name
        raise ConfigError(str(e), file=origin(name) if origin else where.split(": ")[0],
                          field=field_name) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


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
