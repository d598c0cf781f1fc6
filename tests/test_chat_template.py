"""Chat templates: fastdpo's rendering is token-exact with transformers' apply_chat_template on
several templates (ChatML/Qwen with a default system prompt, Llama 3, Zephyr with a system role,
Llama 2 with <<SYS>>, a Qwen3-like thinking block), and fastdpo's own template exported as jinja
renders in transformers what fastdpo renders."""
import json

import pytest
from hf_helpers import TEMPLATES, save_tokenizer
from transformers import AutoTokenizer

from fastdpo.models.chat_template import render
from fastdpo.models.hf_tokenizer import HFTokenizer
from fastdpo.models.tokenizer import Tokenizer, open_tokenizer

CONVERSATIONS = [
    [("user", "hello world")],
    [("system", "be brief"), ("user", "how are you today?")],
    [("system", "be brief"), ("user", "hi"), ("assistant", "The answer is 42."),
     ("user", "  héllo naïve 中文 🤖\n\nwith   spaces ")],
    [("user", "first"), ("assistant", "yes"), ("user", "second"), ("assistant", "no"), ("user", "third?")],
]
# template -> (end-of-turn token, answer prefix, text between answer and end-of-turn)
EXPECTED_ENDS = {"chatml": ("<|im_end|>", "", ""), "llama3": ("<|eot_id|>", "", ""),
                 "zephyr": ("</s>", "", ""), "llama2": ("</s>", " ", " "),
                 "thinking": ("<|im_end|>", "<think>\n\n</think>\n\n", "")}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    out = {}
    for name in TEMPLATES:
        directory = save_tokenizer(root / name, name)
        out[name] = (open_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory)))
    return out


def messages(turns):
    return [{"role": r, "content": t} for r, t in turns]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_prompts_are_token_exact_with_apply_chat_template(tokenizers, name):
    ours, theirs = tokenizers[name]
    assert isinstance(ours, HFTokenizer)
    for turns in CONVERSATIONS:
        expected = theirs.apply_chat_template(messages(turns), add_generation_prompt=True, return_dict=False)
        assert ours.render_conversation(turns) == expected, turns
        text = theirs.apply_chat_template(messages(turns), add_generation_prompt=True, tokenize=False)
        assert ours.render_text(turns) == text


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_answers_end_at_the_templates_end_of_turn(tokenizers, name):
    ours, theirs = tokenizers[name]
    end, prefix, before_end = EXPECTED_ENDS[name]
    assert (ours.end_token, ours.answer_prefix, ours.before_end) == (end, prefix, before_end)
    assert ours.eos_id == theirs.convert_tokens_to_ids(end)
    # no pad token in these tokenizers: the eos token pads (no new embedding row)
    assert ours.pad_id == theirs.convert_tokens_to_ids(theirs.eos_token)
    for turns in CONVERSATIONS:
        answer = "Fine, thanks."
        full = theirs.apply_chat_template(messages([*turns, ("assistant", answer)]), return_dict=False)
        prompt, tokens = ours.render_conversation(turns), ours.render_answer(answer)
        assert full[:len(prompt) + len(tokens)] == prompt + tokens
        assert tokens[-1] == ours.eos_id and ours.decode(tokens[:-1]) == prefix + answer + before_end
    # a sampled answer decoded as is already opens with the prefix: it is not added twice
    assert ours.render_answer(prefix + "Fine, thanks.") == ours.render_answer("Fine, thanks.")


def test_special_token_text_in_a_message_is_that_token_as_in_transformers(tokenizers):
    ours, theirs = tokenizers["chatml"]
    turns = [("user", "close it: <|im_end|> now")]
    ids = ours.render_conversation(turns)
    assert ids == theirs.apply_chat_template(messages(turns), add_generation_prompt=True,
                                             return_dict=False)
    assert ids.count(ours.eos_id) == 3   # the default system turn's, the forged one, the user turn's


def test_fastdpo_template_exported_as_jinja_renders_the_same(tmp_path):
    tok = Tokenizer.train(["hello world, how are you today? be brief. The answer is 42."] * 30,
                          vocab_size=300)
    tok.save_hf(tmp_path, model_max_length=128)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    again = open_tokenizer(tmp_path)   # the exported files read back as a Hugging Face tokenizer
    assert again.kind == "hf" and (again.eos_id, again.pad_id) == (tok.eos_id, tok.pad_id)
    assert (theirs.eos_token, theirs.pad_token, theirs.model_max_length) == ("<|end|>", "<|pad|>", 128)
    for turns in CONVERSATIONS:
        ids = tok.render_conversation(turns)
        expected = theirs.apply_chat_template(messages(turns), add_generation_prompt=True, return_dict=False)
        assert ids == expected
        assert again.render_conversation(turns) == ids
    assert again.render_answer("The answer is 42.") == tok.render_answer("The answer is 42.")


def test_template_errors_name_the_file_and_field(tmp_path, tokenizers):
    directory = save_tokenizer(tmp_path / "t", "chatml")
    (directory / "chat_template.jinja").write_text(
        "{%- for m in messages %}{%- if m.role == 'system' %}{{ raise_exception('no system role') }}"
        "{%- endif %}{{ '<|im_start|>' + m.content + '<|im_end|>' }}{%- endfor %}")
    tok = open_tokenizer(directory)
    with pytest.raises(ValueError, match=r"chat_template\.jinja: chat template: no system role"):
        tok.render_conversation([("system", "s"), ("user", "u")])
    (directory / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ValueError, match=r"chat_template\.jinja: chat template line 1"):
        open_tokenizer(directory)
    (directory / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(ValueError, match="no special token closes the assistant turn"):
        open_tokenizer(directory)


def test_generation_blocks_and_legacy_named_templates(tmp_path):
    text = render("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
                  [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                  add_generation_prompt=False)
    assert text == "ab"
    directory = save_tokenizer(tmp_path / "t", "chatml")
    template = (directory / "chat_template.jinja").read_text()
    (directory / "chat_template.jinja").unlink()
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"},
                               {"name": "default", "template": template}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert open_tokenizer(directory).template == template
