"""fastdpo: a fast, kernel-accelerated Direct Preference Optimization trainer (torch + Triton).

The rooms: ``fastdpo.models`` (GPT-2 and Llama-family architectures, tokenizers and chat templates,
checkpoints, Hugging Face import/export),
``fastdpo.training`` (configs, data, losses, cached reference log-probs, the loop, DPO and SFT),
``fastdpo.generation`` (sampler, judges, pair mining, evaluation, serving), ``fastdpo.kernels``
(Triton kernels, their torch paths and the naive oracle), ``fastdpo.demo`` (the embedded task),
``fastdpo.cli`` (the ``fastdpo`` command) and ``fastdpo.bench``.

The names below are the Python API, imported on first use (``import fastdpo`` stays light)::

    from fastdpo import run_dpo, run_sft, TrainingConfig, DPOConfig, PreferenceDatasetConfig
"""

__version__ = "0.2.0"

_API = {
    "run_dpo": "fastdpo.training.dpo",
    "run_sft": "fastdpo.training.sft",
    "run_sweep": "fastdpo.training.sweep",
    "TrainingConfig": "fastdpo.training.config",
    "DPOConfig": "fastdpo.training.config",
    "PreferenceDatasetConfig": "fastdpo.training.config",
    "SFTConfig": "fastdpo.training.config",
    "SFTDatasetConfig": "fastdpo.training.config",
    "HealthConfig": "fastdpo.training.config",
    "load_config": "fastdpo.training.config",
    "audit_preferences": "fastdpo.training.audit",
    "Tokenizer": "fastdpo.models.tokenizer",
    "GPT": "fastdpo.models.gpt",
    "GPTConfig": "fastdpo.models.gpt",
    "Llama": "fastdpo.models.llama",
    "LlamaConfig": "fastdpo.models.llama",
    "open_tokenizer": "fastdpo.models.tokenizer",
    "HFTokenizer": "fastdpo.models.hf_tokenizer",
    "export_hf": "fastdpo.models.hf_export",
    "load_checkpoint": "fastdpo.models.checkpoint",
    "save_checkpoint": "fastdpo.models.checkpoint",
    "load_policy": "fastdpo.models.checkpoint",
    "sample": "fastdpo.generation.sampler",
    "make_judge": "fastdpo.generation.judge",
    "mine_pairs": "fastdpo.generation.mining",
    "evaluate": "fastdpo.generation.evaluate",
    "HeldoutProbe": "fastdpo.generation.heldout",
    "run_loop": "fastdpo.generation.online_loop",
    "LoopConfig": "fastdpo.generation.online_loop",
    "run_demo": "fastdpo.demo.pipeline",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastdpo' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
