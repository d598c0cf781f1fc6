"""Tiny Hugging Face models and tokenizers built locally (no hub): one per supported family, each
saved with ``save_pretrained`` next to a byte-level BPE tokenizer with its own chat template."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Chat templates in the styles of the families that use them (written for these tests).
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
ZEPHYR = (   # a system role, the eos token closing every turn, newlines from the template's own layout
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
LLAMA2 = (   # [INST] turns, <<SYS>> inside the first one, answers closed by ' </s>'
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{%- set msgs = messages[1:] %}{%- else %}{%- set sys = '' %}{%- set msgs = messages %}{%- endif %}"
    "{%- for message in msgs %}{%- if message['role'] == 'user' %}"
    "{{- bos_token + '[INST] ' + (sys if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] | trim + ' ' + eos_token }}{%- endif %}{%- endfor %}")
THINKING = (   # Qwen3-like: the last answer opens with an (empty) thinking block
    "{%- for message in messages %}{%- if message.role == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# name -> (special tokens, template, eos token, bos token)
TEMPLATES = {
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, "<|im_end|>", None),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"], LLAMA3, "<|eot_id|>", "<|begin_of_text|>"),
    "zephyr": (["<s>", "</s>", "<unk>"], ZEPHYR, "</s>", "<s>"),
    "llama2": (["<s>", "</s>", "<unk>"], LLAMA2, "</s>", "<s>"),
    "thinking": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], THINKING,
                 "<|im_end|>", None),
}
CORPUS = ["hello world, how are you today?", "The answer is 42. Good answer, bad answer.",
          "system prompts matter: be brief", "héllo naïve café 中文 emoji 🤖", "yes no maybe"] * 40


def save_tokenizer(directory: Path, template: str) -> Path:
    """A ~300-token byte-level BPE wrapped in transformers' PreTrainedTokenizerFast, with a chat
    template, saved with ``save_pretrained``."""
    from transformers import PreTrainedTokenizerFast

    specials, source, eos, bos = TEMPLATES[template]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos)
    hf.chat_template = source
    hf.save_pretrained(str(directory))
    return directory


# family -> (transformers config class, model class, config kwargs, chat template)
def family_specs(vocab: int) -> dict:
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}
    return {
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
                 dict(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None), "chatml"),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM,
                  dict(common, rope_theta=500000.0, rope_scaling=llama3_rope, attention_bias=True,
                       rms_norm_eps=1e-5), "llama3"),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(common, tie_word_embeddings=True), "chatml"),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(common, head_dim=16), "thinking"),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(common, sliding_window=48), "zephyr"),
    }


def build_hf_model(directory: Path, family: str, seed: int = 0, **save_kwargs) -> Path:
    """A tiny random ``family`` model and its tokenizer in ``directory``. Weights are drawn wider
    than transformers' init so logits are far apart (greedy choices without near-ties)."""
    save_tokenizer(directory, family_specs(0)[family][3])
    # a few spare embedding rows past the tokenizer's ids, as real checkpoints have
    n_vocab = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size() + 3
    config_cls, model_cls, kwargs, _ = family_specs(n_vocab)[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
            elif name.endswith("norm.weight") or ".ln_" in name or "layernorm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(directory), **save_kwargs)
    return directory


FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "mistral")
