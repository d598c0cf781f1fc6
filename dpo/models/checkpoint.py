"""Checkpoints: a directory holding ``model.safetensors`` + ``config.json`` (+ the tokenizer's files).

config.json records the model family and its config, the step, and the tokenizer's kind and hash;
the tokenizer (and with it the chat template) is saved next to the weights, so resume, eval and
serve find it. Every reader also takes a local Hugging Face model directory
(``fastdpo.models.hf_import``).

A model with LoRA adapters is saved as its adapter in the PEFT format (``adapter_config.json`` +
``adapter_model.safetensors``, see ``fastdpo.models.lora``) with ``config.json`` naming the
``base_checkpoint`` it applies to, plus the merged ``model.safetensors`` when asked (or when no
base is recorded). Loading an adapter-only checkpoint loads its base and merges the adapter in.

Writes are atomic: everything goes into a hidden temporary directory next to the target, is
flushed to disk, and only then renamed into place, so a crash mid-save leaves the previous
checkpoint intact. Nothing is ever unpickled: weights are safetensors, and the seed's legacy
``.pt`` files are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastdpo.errors import ConfigError
from fastdpo.files import fsync_path, temp_sibling
from fastdpo.models import lora
from fastdpo.models.errors import CheckpointError
from fastdpo.models.families import build_model, check_fits_on, config_from_dict, family_of
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.models.hf_import import is_hf_model_dir, load_hf_model
from fastdpo.models.tokenizer import ChatTokenizer, open_tokenizer

__all__ = ["CheckpointError", "load_checkpoint", "load_policy", "load_tokenizer", "read_config",
           "save_checkpoint", "write_directory"]

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
FORMAT = "fastdpo-checkpoint-v1"


def write_directory(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create the directory ``path`` atomically: ``fill(tmp)`` writes its files into a hidden
    temporary sibling, which is flushed and renamed into place (replacing an older ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    tmp.mkdir()
    try:
        fill(tmp)
        for f in sorted(tmp.rglob("*"), reverse=True):   # files before the directories holding them
            fsync_path(f)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_checkpoint(path: str | Path, model: torch.nn.Module, *, step: int = 0,
                    tokenizer: ChatTokenizer | None = None, meta: dict | None = None,
                    extra_files: dict[str, Callable[[Path], None]] | None = None,
                    merged: bool = False) -> Path:
    """Write ``model`` (and optionally its tokenizer) to the directory ``path`` atomically.

    ``meta`` is merged into config.json; ``extra_files`` maps a file name to a function that
    writes it (the trainer stores optimizer and RNG state this way), inside the same atomic
    swap so a checkpoint's parts always belong together. A model with LoRA adapters writes its
    adapter, and the merged weights too when ``merged`` or when ``meta`` has no ``base_checkpoint``.
    """
    def fill(tmp: Path) -> None:
        adapted = isinstance(model, torch.nn.Module) and lora.has_lora(model)
        base = (meta or {}).get("base_checkpoint")
        if adapted:
            lora.save_adapter(tmp, model, base)
        if not adapted or merged or base is None:
            state = lora.merged_state_dict(model) if adapted else model.state_dict()
            state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
        config = {"format": FORMAT, "family": family_of(model.config), "model": model.config.to_dict(),
                  "step": int(step)}
        if tokenizer is not None:
            config["tokenizer_kind"] = tokenizer.kind
            config["tokenizer_hash"] = tokenizer.hash
            config["tokenizer_vocab_size"] = tokenizer.vocab_size
            tokenizer.save(tmp)
        config.update(meta or {})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for name, write in (extra_files or {}).items():
            write(tmp / name)

    return write_directory(path, fill)


def _swap_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        tmp.rename(path)
        return
    # Two renames, not one atomic exchange: a crash between them leaves only ``.NAME.old-*``,
    # which restore_interrupted_swap puts back on the next lookup.
    old = temp_sibling(path, "old")
    path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def restore_interrupted_swap(path: str | Path) -> bool:
    """If ``path`` is missing but one ``.NAME.old-*`` sibling exists (a save died between its two
    renames), rename that previous checkpoint back into place. Returns whether it did."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return False
    olds = [p for p in path.parent.glob(f".{path.name}.old-*") if p.is_dir()]
    if len(olds) != 1:
        return False
    olds[0].rename(path)
    return True


def read_config(path: str | Path) -> dict:
    """The checkpoint's config.json, validated."""
    path = Path(path)
    restore_interrupted_swap(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (not a fastdpo checkpoint directory?)")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}:{e.lineno}: invalid JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                              f"{e.start})") from e
    except RecursionError:
        raise CheckpointError(f"{cfg_file}: JSON nested too deeply") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model" not in config:
        raise CheckpointError(f"{cfg_file}: field 'format' must be {FORMAT!r} with a 'model' section "
                              f"(or a Hugging Face model directory's config.json with a 'model_type')")
    try:
        config_from_dict(config.get("family", "gpt2"), config["model"])
    except ConfigError as e:   # the schema's message names the field
        name = getattr(e, "field_name", None)
        raise CheckpointError(str(e), file=cfg_file, field=f"model.{name}" if name else "model") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: field 'model': {e}") from e
    return config


def load_checkpoint(path: str | Path, tokenizer: ChatTokenizer | None = None, map_location="cpu",
                    check_tokenizer: bool = True) -> tuple[torch.nn.Module, dict]:
    """Load a fastdpo checkpoint directory, or a local Hugging Face model directory, into a new
    model of its family; returns ``(model, config)``.

    With a ``tokenizer``, its vocabulary must fit the model and match the one the checkpoint
    was trained with (hash stored in config.json); a mismatch is an error, not a warning,
    because it silently turns every token into a different one.
    """
    path = Path(path)
    if is_hf_model_dir(path):
        model, config = load_hf_model(path, map_location)
        if tokenizer is not None and check_tokenizer:
            check_tokenizer_matches(path, config, tokenizer)
        return model, config
    config = read_config(path)
    model_config = config_from_dict(config.get("family", "gpt2"), config["model"])
    if torch.device(map_location).type != "cpu":   # the CPU's own check is build_model's
        try:
            check_fits_on(model_config, map_location)
        except ConfigError as e:
            raise CheckpointError(str(e), file=path / CONFIG, field="model") from None
    if tokenizer is not None and check_tokenizer:
        check_tokenizer_matches(path, config, tokenizer)
    weights = path / WEIGHTS
    if not weights.is_file() and lora.is_adapter_dir(path):
        return _load_with_adapter(path, config, tokenizer, map_location, check_tokenizer), config
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    try:
        state = load_file(weights, device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: corrupt or truncated safetensors file ({e})") from e
    model = build_model(model_config)
    _load_state(model, state, weights)
    return model.to(map_location), config


def _load_with_adapter(path: Path, config: dict, tokenizer, map_location, check_tokenizer) -> torch.nn.Module:
    """An adapter-only checkpoint: its base (itself possibly one) with the adapter merged in."""
    model = load_base(path, config, tokenizer, map_location, check_tokenizer)
    try:
        lora.load_adapter(path, model)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    return lora.merge_lora(model)


def load_base(path: Path, config: dict, tokenizer=None, map_location="cpu",
              check_tokenizer: bool = True) -> torch.nn.Module:
    """The model the adapter in the checkpoint ``path`` applies to (``config.json``'s
    ``base_checkpoint``), loaded."""
    base = config.get("base_checkpoint")
    if not base:
        raise CheckpointError(f"{path / CONFIG}: field 'base_checkpoint' is missing: an adapter-only "
                              f"checkpoint needs the checkpoint its adapter applies to")
    try:
        return load_checkpoint(base, tokenizer=tokenizer, map_location=map_location,
                               check_tokenizer=check_tokenizer)[0]
    except CheckpointError as e:
        raise CheckpointError(f"{path / CONFIG}: field 'base_checkpoint': {e}") from e


def check_tokenizer_matches(path: Path, config: dict, tokenizer: ChatTokenizer) -> None:
    vocab = config["model"]["vocab_size"]
    stored_vocab = config.get("tokenizer_vocab_size")
    if tokenizer.vocab_size > vocab or (stored_vocab is not None and tokenizer.vocab_size != stored_vocab):
        raise CheckpointError(
            f"{path / CONFIG}: tokenizer vocab size {tokenizer.vocab_size} does not match the "
            f"checkpoint's (model vocab_size={vocab}, tokenizer_vocab_size={stored_vocab})")
    stored_hash = config.get("tokenizer_hash")
    if stored_hash is not None and stored_hash != tokenizer.hash:
        raise CheckpointError(
            f"{path / CONFIG}: tokenizer hash {tokenizer.hash} differs from the one this checkpoint "
            f"was trained with ({stored_hash}); pass the checkpoint's own tokenizer.json")


def load_policy(ckpt: str | Path, tokenizer_path: str | Path | None = None,
                device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ChatTokenizer]:
    """A checkpoint's model in eval mode and its tokenizer (its own unless ``tokenizer_path``)."""
    tok = open_tokenizer(tokenizer_path) if tokenizer_path else load_tokenizer(ckpt)
    model, _ = load_checkpoint(ckpt, tokenizer=tok, map_location=device)
    return model.eval(), tok


def load_tokenizer(path: str | Path) -> ChatTokenizer:
    """The tokenizer saved inside a checkpoint (or Hugging Face model) directory."""
    file = Path(path) / TOKENIZER
    if not Path(path).is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; pass --tokenizer explicitly")
    return open_tokenizer(path)


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: parameter names do not match the model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{source}: '{k}' has shape {tuple(v.shape)}, "
                                  f"model expects {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=True)


def import_legacy_checkpoint(pt_file: str | Path) -> GPT:
    """Read the seed's ``{"model": state_dict, "config": dict}`` ``.pt`` file safely."""
    pt_file = Path(pt_file)
    if not pt_file.is_file():
        raise CheckpointError(f"legacy checkpoint not found: {pt_file}")
    try:
        blob = torch.load(pt_file, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise CheckpointError(f"{pt_file}: not a loadable weights-only checkpoint ({e})") from e
    if not isinstance(blob, dict) or not {"model", "config"} <= set(blob):
        raise CheckpointError(f"{pt_file}: expected a dict with 'model' and 'config' keys")
    try:
        config = GPTConfig.from_dict(dict(blob["config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{pt_file}: field 'config': {e}") from e
    if not isinstance(blob["model"], dict):
        raise CheckpointError(f"{pt_file}: field 'model' must be a state dict (parameter name -> tensor), "
                              f"got {type(blob['model']).__name__}")
    for k, v in blob["model"].items():
        if not (isinstance(k, str) and isinstance(v, torch.Tensor)):
            raise CheckpointError(f"{pt_file}: field 'model': entry {k!r} is a {type(v).__name__}, "
                                  f"not a tensor")
    state = {k.removeprefix("_orig_mod."): v for k, v in blob["model"].items()}
    # nanoGPT keeps a tied lm_head copy and, without flash attention, a causal-mask buffer.
    lm_head = state.pop("lm_head.weight", None)
    if lm_head is not None and not torch.equal(lm_head, state.get("transformer.wte.weight", lm_head)):
        raise CheckpointError(f"{pt_file}: lm_head.weight is not tied to transformer.wte.weight")
    state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    model = GPT(config)
    _load_state(model, state, pt_file)
    return model
