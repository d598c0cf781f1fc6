"""Supervised fine-tuning on (prompt, response) data: ``run_sft`` and ``fastdpo sft``.

The loss is the mean per-token NLL of the answer tokens (``<|end|>`` included), computed by the
same ``kernels.linear_sequence_logprobs`` as DPO: summed answer log-probs per row, divided by the
number of answer tokens in the whole optimizer step. It makes the starting checkpoint of DPO,
from an existing checkpoint (fastdpo's or a local Hugging Face model directory) or from a fresh
model of a named shape (``PRESETS``: GPT-2 and Llama shapes). A fresh model given no tokenizer gets a
byte-level BPE trained on the SFT data itself (``sft.tokenizer_vocab_size``), saved as
``run_dir/tokenizer.json`` and in every checkpoint, so ``fastdpo sft`` can start a loop from
nothing but data.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastdpo import runtime
from fastdpo.models.checkpoint import load_checkpoint, load_tokenizer
from fastdpo.models.families import FAMILIES, PRESETS, build_model, config_from_preset
from fastdpo.models.tokenizer import ChatTokenizer, Tokenizer
from fastdpo.runtime import resolve_device, resolve_precision, to_device
from fastdpo.training.batches import TokenizedSFT, collate_sft, eval_batches, load_sft_data
from fastdpo.training.config import HealthConfig, SFTConfig, SFTDatasetConfig, TrainingConfig, to_dict
from fastdpo.training.data import load_examples
from fastdpo.training.finetuning import load_trainable
from fastdpo.training.health import HealthMonitor
from fastdpo.training.logprobs import sequence_logprobs
from fastdpo.training.loop import Task, Trainer
from fastdpo.training.packing import flat_sft
from fastdpo.training.runs import (
    join_ranks,
    prepare_run_dir,
    resolve_tokenizer,
    say_on_main,
    train_to_completion,
)


class SFTTask(Task):
    def __init__(self, model, train: Sequence[TokenizedSFT], val: Sequence[TokenizedSFT], *, pad_id: int,
                 device: torch.device, kernel: str = "auto",
                 eval_batch_size: int = 8, packing: bool = False):
        self.model, self.train, self.val = model, list(train), list(val)
        self.pad_id, self.device, self.kernel = pad_id, device, kernel
        self.packing = packing   # a micro-batch's examples end to end, no padding (training.packing)
        self.n_train, self.n_val = len(self.train), len(self.val)
        self.lengths = [x.length for x in self.train]
        self._val_batches = eval_batches([x.length for x in self.val], eval_batch_size)

    def _items(self, train):
        return self.train if train else self.val

    def step_norm(self, micro_batches, train=True):
        items = self._items(train)
        return {"tokens": sum(len(items[i].response) for idx in micro_batches for i in idx)}

    def n_tokens(self, idx, train=True):
        items = self._items(train)
        return sum(items[i].n_tokens for i in idx)

    def val_batches(self):
        return self._val_batches

    def heldout_prompts(self):
        return [x.prompt for x in self.val]

    def bind_policy(self, policy):
        self.model = policy

    def loss(self, idx, norm, train=True):
        items = [self._items(train)[i] for i in idx]
        if self.packing:
            ids, mask, flat = flat_sft(items, self.pad_id)
            flat = flat.to(self.device)
        else:
            (ids, mask), flat = collate_sft(items, self.pad_id), None
        ids, mask = to_device(ids, self.device), to_device(mask, self.device)
        lp = sequence_logprobs(self.model, ids, mask, self.kernel, flat).float()
        loss = -lp.sum() / norm["tokens"]
        return loss, {"nll": -lp.detach().sum(), "answer_tokens": sum(len(self._items(train)[i].response)
                                                                      for i in idx)}

    def summarize(self, sums):
        loss = float(sums["nll"]) / max(1, sums["answer_tokens"])
        return {"loss": loss, "ppl": float(torch.tensor(loss).exp())}


_MODEL_CONFIGS = tuple(config_cls for config_cls, _ in FAMILIES.values())


def _is_fresh(init) -> bool:
    if isinstance(init, _MODEL_CONFIGS):
        return True
    return isinstance(init, str) and init in PRESETS and not Path(init).exists()


def init_model(init, tok: ChatTokenizer, device: torch.device) -> torch.nn.Module:
    """A checkpoint directory (fastdpo's or Hugging Face's), a preset name (``tiny``, ``gpt2-124m``,
    ``llama-tiny``, ``llama-124m``) or a model config (``GPTConfig``, ``LlamaConfig``)."""
    if isinstance(init, _MODEL_CONFIGS):
        return build_model(init).to(device)
    if _is_fresh(init):
        return build_model(config_from_preset(init, vocab_size=tok.vocab_size)).to(device)
    return load_checkpoint(init, tokenizer=tok, map_location=device)[0]


def train_data_tokenizer(dataset_config: SFTDatasetConfig, vocab_size: int, path: Path) -> Path:
    """A byte-level BPE trained on the SFT data's prompts and answers, saved at ``path``."""
    examples = load_examples(dataset_config.paths, dataset_config.format, dataset_config.on_error, "sft",
                             dataset_config.max_rows)
    texts = [text for ex in examples for text in (*(t for _, t in ex.turns), ex.response)]
    return Tokenizer.train(texts, vocab_size=vocab_size).save(path)


def _data_tokenizer(init, train_config: TrainingConfig, sft_config: SFTConfig,
                    dataset_config: SFTDatasetConfig, resume_path: Path | None, say) -> ChatTokenizer:
    """For a fresh model given no tokenizer: one trained on the data (as large as a model config's
    vocabulary, else ``sft.tokenizer_vocab_size``), or, resuming, the one the checkpoint holds."""
    if resume_path is not None:
        return load_tokenizer(resume_path)
    vocab = init.vocab_size if isinstance(init, _MODEL_CONFIGS) else sft_config.tokenizer_vocab_size
    path = runtime.run_on_main(train_data_tokenizer, dataset_config, vocab,
                               train_config.run_dir / "tokenizer.json")
    tok = Tokenizer.load(path)
    say(f"tokenizer: none given for a fresh model; trained a {tok.vocab_size}-token BPE on the data "
        f"-> {path}", flush=True)
    return tok


def run_sft(init_checkpoint, train_config: TrainingConfig, sft_config: SFTConfig,
            dataset_config: SFTDatasetConfig, tokenizer: ChatTokenizer | str | Path | None = None, *,
            resume: bool | str | Path = False, on_step: Callable | None = None,
            health: HealthConfig | None = None, heldout_probe=None) -> Path:
    """Fine-tune ``init_checkpoint`` (a checkpoint or Hugging Face model directory, a preset name, or
    a model config for a fresh model) on answer tokens; returns the final checkpoint directory.
    ``health`` and ``heldout_probe`` as in ``run_dpo`` (the reference is the starting model).
    ``tokenizer`` may be None for a fresh model: one is trained on the data (see the module
    docstring)."""
    fresh = _is_fresh(init_checkpoint)
    train_tokenizer = tokenizer is None and not train_config.tokenizer_name and fresh
    tok = None if train_tokenizer else resolve_tokenizer(tokenizer, None if fresh else Path(init_checkpoint),
                                                         train_config)
    train_config = join_ranks(train_config, "examples")
    resume_path = prepare_run_dir(train_config, resume)
    say = say_on_main()   # progress: false hides the bars only
    if tok is None:
        tok = _data_tokenizer(init_checkpoint, train_config, sft_config, dataset_config, resume_path, say)
    torch.manual_seed(train_config.seed)
    device = resolve_device(train_config.device)
    base = None
    if fresh:
        if train_config.finetuning_type == "lora":
            raise ValueError("finetuning_type lora needs a checkpoint to adapt; a fresh model "
                             f"({init_checkpoint}) has no base worth keeping frozen")
        model = init_model(init_checkpoint, tok, device)
    else:
        model, base = load_trainable(init_checkpoint, train_config, tok, device, say=say)
    train, val, stats = load_sft_data(dataset_config, tok, sft_config.max_length,
                                      sft_config.max_prompt_length, model.config.block_size,
                                      train_config.seed, sft_config.max_completion_length)
    say(f"data: {len(train)} train / {len(val)} val examples ({stats.summary()})", flush=True)
    config = {"train": to_dict(train_config), "sft": to_dict(sft_config), "data": to_dict(dataset_config),
              "init": str(init_checkpoint)}

    def build(logger):
        task = SFTTask(model, train, val, pad_id=tok.pad_id, device=device, kernel=train_config.kernel,
                       eval_batch_size=2 * train_config.micro_batch_size, packing=train_config.packing)
        return Trainer(model, task, train_config, tokenizer=tok, device=device,
                       precision=resolve_precision(train_config.mixed_precision, device),
                       meta={"kind": "sft", "run_name": train_config.run_name, "config": config,
                             **({"base_checkpoint": base} if base else {})},
                       logger=logger, on_step=on_step)

    return train_to_completion(build, train_config, config, resume_path, say,
                               HealthMonitor(health, heldout_probe))
