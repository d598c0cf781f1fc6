"""transformers' ``config.json`` <-> fastdpo model configs, both directions, per family.

Import reads what a ``save_pretrained`` directory holds (transformers 4 spells RoPE as
``rope_theta`` + ``rope_scaling``, transformers 5 as ``rope_parameters``; both are read) and refuses
what fastdpo's classes would compute differently, naming the field: another activation, a
quantized checkpoint, an unsupported RoPE type. Export writes the transformers-4 spelling, which
transformers 5 and vLLM also read.

A sliding attention window (Mistral, Qwen with ``use_sliding_window``) is honoured by limiting
the model's context (block_size) to the window, inside which sliding and full attention agree.
"""
from __future__ import annotations

from pathlib import Path

from fastdpo.models.errors import CheckpointError
from fastdpo.models.gpt import GPTConfig
from fastdpo.models.llama import LlamaConfig

MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# transformers' defaults for fields a config.json may leave out
_CONTEXT = {"llama": 2048, "mistral": 32768, "qwen2": 32768, "qwen3": 32768}
_EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def config_from_hf(hf: dict, source: Path) -> tuple[str, GPTConfig | LlamaConfig]:
    """``(family, config)`` for a transformers config.json (``source`` names it in errors)."""
    def fail(field: str, why: str):
        raise CheckpointError(f"{source}: field '{field}': {why}")

    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: expected a JSON object")
    if hf.get("quantization_config") is not None:
        method = (hf["quantization_config"] or {}).get("quant_method", "?")
        fail("quantization_config", f"quantized checkpoints ({method}) are not supported; use the "
                                    f"unquantized (float16/bfloat16/float32) weights")
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        fail("model_type", f"{model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})")
    try:
        if model_type == "gpt2":
            return "gpt2", _gpt2_from_hf(hf, fail)
        return "llama", _llama_from_hf(hf, model_type, fail)
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: {e}") from e


def _number(hf: dict, key: str, fail, default=None):
    value = hf.get(key, default)
    if value is None:
        fail(key, "missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(key, f"expected a number, got {value!r}")
    return value


def _gpt2_from_hf(hf: dict, fail) -> GPTConfig:
    n_embd = _number(hf, "n_embd", fail)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        fail("n_inner", f"{hf['n_inner']}: fastdpo's GPT-2 MLP is 4 * n_embd wide")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        fail("activation_function",
             f"{hf['activation_function']!r}: fastdpo's GPT-2 uses tanh-GELU (gelu_new)")
    if abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
        fail("layer_norm_epsilon", f"{hf['layer_norm_epsilon']}: fastdpo's GPT-2 LayerNorm uses 1e-5")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        fail("scale_attn_by_inverse_layer_idx",
             "only GPT-2's standard 1/sqrt(head_dim) attention scale is supported")
    if hf.get("add_cross_attention"):
        fail("add_cross_attention", "cross-attention is not supported")
    if hf.get("tie_word_embeddings") is False:
        fail("tie_word_embeddings", "fastdpo's GPT-2 ties lm_head to the token embedding")
    return GPTConfig(vocab_size=_number(hf, "vocab_size", fail),
                     block_size=_number(hf, "n_positions", fail, 1024), n_layer=_number(hf, "n_layer", fail),
                     n_head=_number(hf, "n_head", fail), n_embd=n_embd, dropout=0.0, bias=True)


def _rope(hf: dict, fail) -> tuple[float, dict | None]:
    theta, scaling = hf.get("rope_theta", 10000.0), hf.get("rope_scaling")
    params = hf.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            fail("rope_parameters", "per-layer RoPE parameters are not supported")
        theta, scaling = params.get("rope_theta", theta), params
    if float(hf.get("partial_rotary_factor", (scaling or {}).get("partial_rotary_factor", 1.0))) != 1.0:
        fail("partial_rotary_factor", "partial rotary embeddings are not supported")
    if scaling is not None and not isinstance(scaling, dict):
        fail("rope_scaling", f"expected a mapping, got {scaling!r}")
    scaling = {k: v for k, v in (scaling or {}).items() if k != "partial_rotary_factor"} or None
    return float(theta), scaling


def _llama_from_hf(hf: dict, model_type: str, fail) -> LlamaConfig:
    if hf.get("hidden_act", "silu") != "silu":
        fail("hidden_act", f"{hf['hidden_act']!r}: the Llama family's SwiGLU uses silu")
    n_head = _number(hf, "num_attention_heads", fail)
    block = _number(hf, "max_position_embeddings", fail, _CONTEXT[model_type])
    window = hf.get("sliding_window")
    sliding = model_type == "mistral" or hf.get("use_sliding_window") or \
        "sliding_attention" in (hf.get("layer_types") or ())
    if sliding and window:
        block = min(block, int(window))
    attention_bias = bool(hf.get("attention_bias", False))
    theta, scaling = _rope(hf, fail)
    return LlamaConfig(
        vocab_size=_number(hf, "vocab_size", fail), block_size=block,
        n_layer=_number(hf, "num_hidden_layers", fail), n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=_number(hf, "hidden_size", fail),
        intermediate_size=_number(hf, "intermediate_size", fail),
        head_dim=hf.get("head_dim") or (128 if model_type == "qwen3" else None),
        rope_theta=theta, rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=model_type == "qwen2" or (attention_bias and model_type in ("llama", "qwen3")),
        o_bias=attention_bias and model_type in ("llama", "qwen3"),
        mlp_bias=bool(hf.get("mlp_bias", False)) and model_type == "llama",
        qk_norm=model_type == "qwen3", tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        model_type=model_type)


def config_to_hf(config: GPTConfig | LlamaConfig, *, dtype: str = "float32", bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None) -> dict:
    """The config.json transformers' own class for this model reads (no custom code)."""
    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {list(_EXPORT_DTYPES)}, got {dtype!r}")
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    if isinstance(config, GPTConfig):
        if not config.bias:
            raise ValueError("GPTConfig.bias is false: transformers' GPT2LMHeadModel always has biases")
        return {"architectures": [ARCHITECTURES["gpt2"]], "model_type": "gpt2",
                "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
                "n_layer": config.n_layer,
                "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
                "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
                "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True,
                "tie_word_embeddings": True, "use_cache": True, "torch_dtype": dtype, **ids}
    out = {"architectures": [ARCHITECTURES[config.model_type]], "model_type": config.model_type,
           "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
           "intermediate_size": config.intermediate_size, "num_hidden_layers": config.n_layer,
           "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
           "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": config.block_size,
           "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
           "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
           "tie_word_embeddings": config.tie_word_embeddings, "attention_dropout": 0.0,
           "initializer_range": 0.02, "use_cache": True, "torch_dtype": dtype, **ids}
    if config.model_type in ("llama", "qwen3"):
        out["attention_bias"] = config.qkv_bias
    if config.model_type == "llama":
        out["mlp_bias"] = config.mlp_bias
    if config.model_type in ("mistral", "qwen2", "qwen3"):   # the window never binds inside block_size
        out["sliding_window"] = None
    if config.model_type in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, max_window_layers=config.n_layer)
    return out
