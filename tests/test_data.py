import json

import pytest
import torch

from fastdpo.models.tokenizer import Tokenizer
from fastdpo.training.batches import (
    collate_pairs,
    epoch_batches,
    load_preference_data,
    split_val,
    tokenize_pairs,
    tokenize_sft,
)
from fastdpo.training.config import PreferenceDatasetConfig, load_config
from fastdpo.training.data import DataError, DataStats, load_examples


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["what is two plus two? four. the answer is 4, not five."] * 20, vocab_size=300)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


QA = [("what is two plus two?", "four", "five"), ("the answer?", "4", "not 4, five")]


def test_three_formats_load_to_the_same_pairs(tmp_path, tok):
    prompt = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": q, "chosen": c, "rejected": r, "score_chosen": 9} for q, c, r in QA])
    conv = tmp_path / "c.json"   # a JSON array, not JSONL
    conv.write_text(json.dumps([{"conversations": [{"from": "user", "value": q}], "chosen": c, "rejected": r}
                                for q, c, r in QA], indent=2))
    hh = write_jsonl(tmp_path / "h.jsonl", [
        {"chosen": f"\n\nHuman: {q}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {r}"}
        for q, c, r in QA])
    got = []
    for path in (prompt, conv, hh):
        stats = DataStats()
        ex = load_examples([path], stats=stats)
        got.append(tokenize_pairs(ex, tok, 64, 64, 128, stats))
    assert got[0] == got[1] == got[2]
    assert len(got[0]) == 2
    assert got[0][0].prompt == tok.render_prompt("what is two plus two?")
    assert got[0][0].chosen == tok.render_answer("four")
    assert load_examples([prompt])[0].meta == {"score_chosen": 9}
    assert stats.formats == {str(hh): "hh"}


def test_multi_turn_history_is_rendered_by_the_chat_template(tmp_path, tok):
    turns = [("user", "what is two?"), ("assistant", "a number."), ("user", "plus two?")]
    path = write_jsonl(tmp_path / "c.jsonl", [{"conversations": [{"from": r, "value": v} for r, v in turns],
                                               "chosen": "four", "rejected": "five"}])
    history = "\n\nHuman: what is two?\n\nAssistant: a number.\n\nHuman: plus two?\n\nAssistant: "
    hh = write_jsonl(tmp_path / "h.jsonl", [{"chosen": history + "four", "rejected": history + "five"}])
    a = tokenize_pairs(load_examples([path]), tok, 64, 64, 128, DataStats())
    b = tokenize_pairs(load_examples([hh]), tok, 64, 64, 128, DataStats())
    assert a == b and a[0].prompt == tok.render_conversation(turns)



def msgs(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def test_trl_conversational_rows_load_to_the_same_pairs(tmp_path, tok):
    """TRL's conversational format (explicit and implicit prompt), ShareGPT with role/content and
    with from/value: the same examples, a system message included."""
    system, q, c, r = "be brief", "what is two plus two?", "four", "five"
    explicit = write_jsonl(tmp_path / "e.jsonl", [{"prompt": msgs(("system", system), ("user", q)),
                                                   "chosen": msgs(("assistant", c)),
                                                   "rejected": msgs(("assistant", r)), "id": 7}])
    prompt = (("system", system), ("user", q))
    implicit = write_jsonl(tmp_path / "i.jsonl", [{"chosen": msgs(*prompt, ("assistant", c)),
                                                   "rejected": msgs(*prompt, ("assistant", r))}])
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": msgs(("system", system), ("user", q)),
                                                   "chosen": c, "rejected": r}])
    from_value = write_jsonl(tmp_path / "f.jsonl", [{"conversations": [{"from": "system", "value": system},
                                                                       {"from": "human", "value": q}],
                                                     "chosen": {"from": "gpt", "value": c},   # LLaMA-Factory
                                                     "rejected": {"from": "gpt", "value": r}}])
    stats = DataStats()
    examples = [load_examples([p], stats=stats)[0] for p in (explicit, implicit, sharegpt, from_value)]
    assert all((e.turns, e.chosen, e.rejected) == ([("system", system), ("user", q)], c, r) for e in examples)
    assert examples[0].meta == {"id": 7}
    assert list(stats.formats.values()) == ["prompt", "implicit", "conversations", "conversations"]
    pairs = tokenize_pairs(examples[:1], tok, 64, 64, 128, stats)
    assert pairs[0].prompt == tok.render_conversation([("system", system), ("user", q)])


def test_sft_messages_and_prompt_completion_rows(tmp_path):
    rows = [{"messages": msgs(("system", "s"), ("user", "q"), ("assistant", "a"))}]
    messages = load_examples([write_jsonl(tmp_path / "m.jsonl", rows)], kind="sft")[0]
    completion = load_examples([write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": msgs(("system", "s"), ("user", "q")), "completion": msgs(("assistant", "a"))}])],
        kind="sft")[0]
    plain = load_examples([write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "completion": "a"}])],
                          kind="sft")[0]
    assert (messages.turns, messages.response) == (completion.turns, completion.response) == \
        ([("system", "s"), ("user", "q")], "a")
    assert (plain.turns, plain.response) == ([("user", "q")], "a")
    with pytest.raises(DataError, match=r"x\.jsonl:1: messages must end with the assistant's answer"):
        load_examples([write_jsonl(tmp_path / "x.jsonl", [{"messages": msgs(("user", "q"))}])], kind="sft")


TRL_BAD_ROWS = [
    ({"prompt": msgs(("user", "q")), "chosen": msgs(("assistant", "a"), ("user", "more?")),
      "rejected": msgs(("assistant", "b"))}, "field 'chosen' must hold exactly one assistant message"),
    ({"prompt": msgs(("user", "q")), "chosen": msgs(("assistant", "a")),
      "rejected": [{"role": "assistant"}]}, r"field 'rejected\[0\]' must be"),
    ({"prompt": msgs(("tool", "q")), "chosen": "a", "rejected": "b"},
     r"field 'prompt\[0\]\.role': unknown role"),
    ({"prompt": msgs(("user", "q"), ("assistant", "x")), "chosen": "a", "rejected": "b"},
     "end with a user turn"),
]


@pytest.mark.parametrize("bad,reason", TRL_BAD_ROWS)
def test_bad_conversational_rows_name_file_line_and_field(tmp_path, bad, reason):
    good = {"prompt": msgs(("user", "q")), "chosen": msgs(("assistant", "a")),
            "rejected": msgs(("assistant", "b"))}
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{reason}"):
        load_examples([path])


def test_implicit_prompt_rows_must_share_their_prompt(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [{"chosen": msgs(("user", "q"), ("assistant", "a")),
                                               "rejected": msgs(("user", "other"), ("assistant", "b"))}])
    with pytest.raises(DataError, match=r"i\.jsonl:1: chosen and rejected conversations do not share"):
        load_examples([path])

BAD_ROWS = [
    ('{"prompt": "q", "chosen": "a", "rejected": ', "invalid JSON"),
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "field 'chosen' is an empty response"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
]


@pytest.mark.parametrize("bad,reason", BAD_ROWS)
def test_bad_rows_name_file_line_and_reason(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{reason}"):
        load_examples([path])


def test_skip_counts_bad_rows(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] + [b for b, _ in BAD_ROWS]
    stats = DataStats()
    ex = load_examples([write_jsonl(tmp_path / "d.jsonl", rows)], on_error="skip", stats=stats)
    assert len(ex) == 1 and stats.skipped == len(BAD_ROWS) and stats.rows == len(rows)
    assert stats.errors[0].startswith(f"{tmp_path / 'd.jsonl'}:2: invalid JSON")


def test_json_array_errors_have_lines(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"prompt": "q", "chosen": "a", "rejected": "b"},\n'
                    ' {"prompt": "q", "chosen": "a"}\n]')
    with pytest.raises(DataError, match=r"a\.json:3: missing field 'rejected'"):
        load_examples([path])


def test_hh_rows_must_share_their_prompt(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: x",
                                               "rejected": "\n\nHuman: b\n\nAssistant: y"}])
    with pytest.raises(DataError, match="h.jsonl:1: .*do not share their prompt"):
        load_examples([path])


def test_format_override_and_undetectable_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="missing field 'prompt'"):
        load_examples([path], fmt="prompt")
    with pytest.raises(DataError, match="is not an HH transcript"):
        load_examples([path])   # auto: a row with "chosen" but no prompt reads as HH


def test_long_prompts_dropped_and_responses_truncated(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "two " * 40, "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "four " * 30, "rejected": "b"}])
    stats = DataStats()
    pairs = tokenize_pairs(load_examples([path]), tok, max_length=16, max_prompt_length=20, block_size=128,
                           stats=stats)
    assert stats.dropped_long_prompt == 1 and stats.truncated == 1
    assert len(pairs) == 1 and len(pairs[0].prompt) + len(pairs[0].chosen) == 16   # max_length: the total
    assert pairs[0].rejected == tok.render_answer("b")
    assert "1 dropped" in stats.summary() and "1 with an answer cut" in stats.summary()


def test_sft_and_dpo_cut_a_long_row_at_the_same_max_length(tmp_path, tok):
    """``max_length`` is prompt + answer in both (TRL's meaning); the answer is cut on the right and
    loses its end-of-turn token; ``max_completion_length`` caps the answer alone."""
    long = "four " * 40
    pref = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the answer?", "chosen": long, "rejected": "4"}])
    sft = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "the answer?", "response": long}])
    prompt = tok.render_prompt("the answer?")
    for max_length in (12, 20):
        (pair,) = tokenize_pairs(load_examples([pref]), tok, max_length, 64, 128, DataStats())
        (row,) = tokenize_sft(load_examples([sft], kind="sft"), tok, max_length, 64, 128, DataStats())
        assert pair.prompt == row.prompt == prompt
        assert len(pair.prompt) + len(pair.chosen) == len(row.prompt) + len(row.response) == max_length
        assert pair.chosen == row.response == tok.render_answer(long)[:max_length - len(prompt)]
        assert tok.eos_id not in pair.chosen
    # the model's context caps the total too, and max_completion_length the answer alone
    (row,) = tokenize_sft(load_examples([sft], kind="sft"), tok, 64, 64, 15, DataStats())
    assert len(row.prompt) + len(row.response) == 15
    (pair,) = tokenize_pairs(load_examples([pref]), tok, 64, 64, 128, DataStats(), max_completion_length=3)
    assert len(pair.chosen) == 3 and pair.rejected == tok.render_answer("4")
    # a prompt that leaves no room for an answer is dropped, never left-truncated
    stats = DataStats()
    assert tokenize_sft(load_examples([sft], kind="sft"), tok, len(prompt), 64, 128, stats) == []
    assert stats.dropped_long_prompt == 1


def _mined(tok, **over):
    row = {"prompt": "the answer?", "chosen": "4", "rejected": "not 4, five",
           "tokenizer_hash": tok.hash, "prompt_ids": tok.render_prompt("the answer?"),
           "chosen_ids": [*tok.encode("4"), tok.eos_id], "rejected_ids": tok.encode("not 4, fi"),
           "chosen_finish": "stop", "rejected_finish": "length"}
    return {**row, **over}


def test_mined_pairs_train_on_their_ids_when_the_tokenizer_matches(tmp_path, tok):
    # ids that are not what the text encodes to: the ids win, for this tokenizer
    odd = [tok.encode("4")[0], tok.encode("4")[0], tok.eos_id]
    path = write_jsonl(tmp_path / "m.jsonl", [_mined(tok, chosen_ids=odd),
                                              _mined(tok, tokenizer_hash="other")])
    stats = DataStats()
    same, other = tokenize_pairs(load_examples([path]), tok, 64, 64, 128, stats)
    assert (same.chosen, same.rejected) == (odd, tok.encode("not 4, fi"))
    assert stats.sampled_ids == 1 and stats.retokenized == 1 and "1 re-encoded from text" in stats.summary()
    # another tokenizer's ids: the text is encoded again, and the cut-off rejected answer stays open
    assert other.chosen == tok.render_answer("4") and other.rejected == tok.encode("not 4, five")
    assert load_examples([path])[0].meta == {}   # the id fields are not metadata


@pytest.mark.parametrize("over,message", [
    ({"chosen_ids": [1, "x"]}, "field 'chosen_ids' must be a list of token ids"),
    ({"rejected_ids": None}, "missing field 'rejected_ids'"),
    ({"tokenizer_hash": None}, "missing field 'tokenizer_hash'"),
    ({"rejected_finish": "eos"}, "field 'rejected_finish' must be 'stop' or 'length'"),
    ({"chosen_ids": []}, "field 'chosen_ids' is empty"),
])
def test_bad_mined_id_fields_name_the_field(tmp_path, tok, over, message):
    path = write_jsonl(tmp_path / "m.jsonl", [_mined(tok, **over)])
    with pytest.raises(DataError, match=rf"m.jsonl:1: {message}"):
        load_examples([path])


def test_mined_ids_outside_the_vocabulary_are_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", [_mined(tok, chosen_ids=[tok.vocab_size + 5])])
    with pytest.raises(DataError, match=r"m.jsonl:1: token id \d+ is outside"):
        tokenize_pairs(load_examples([path]), tok, 64, 64, 128, DataStats())


def test_val_split_is_seeded_and_disjoint():
    items = list(range(100))
    tr, va = split_val(items, 0.1, seed=3)
    assert len(va) == 10 and sorted(tr + va) == items
    assert split_val(items, 0.1, seed=3) == (tr, va)
    assert len(split_val(items, 7, seed=3)[1]) == 7


def test_bucketed_batches_cover_each_epoch_and_cut_padding():
    lengths = [int(x) for x in torch.randint(5, 200, (1000,), generator=torch.Generator().manual_seed(0))]
    b0 = epoch_batches(lengths, 8, seed=1, epoch=0)
    assert len(b0) == 125 and sorted(i for b in b0 for i in b) == list(range(1000))
    assert b0 == epoch_batches(lengths, 8, seed=1, epoch=0) != epoch_batches(lengths, 8, seed=1, epoch=1)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in b0)
    random_batches = [list(range(i, i + 8)) for i in range(0, 1000, 8)]
    padded_random = sum(8 * max(lengths[i] for i in b) for b in random_batches)
    assert padded < 0.75 * padded_random


def test_collate_puts_chosen_and_rejected_in_one_batch(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in QA])
    pairs = tokenize_pairs(load_examples([path]), tok, 64, 64, 128, DataStats())
    ids, mask = collate_pairs(pairs, tok.pad_id)
    assert ids.shape[0] == 4
    p0 = pairs[0]
    n = len(p0.prompt) + len(p0.rejected)
    assert ids[2, :n].tolist() == p0.prompt + p0.rejected
    assert mask[2].sum() == len(p0.rejected) and not mask[2, :len(p0.prompt)].any()
    assert (ids[2, n:] == tok.pad_id).all()


def test_config_paths_and_val_split(tmp_path, tok):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(20)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = PreferenceDatasetConfig(dataset_name=str(tmp_path / "d.jsonl"), val_size=0.25)
    train, val, _ = load_preference_data(cfg, tok, 16, 16, 64, seed=0)
    assert len(train) == 15 and len(val) == 5


def test_yaml_unknown_keys_name_file_and_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 1.0e-6\n  lerning_rate: 2\n")
    with pytest.raises(ValueError, match=r"c\.yaml: train: unknown key 'lerning_rate'"):
        load_config(f)
    f.write_text("trian: {}\n")
    with pytest.raises(ValueError, match=r"c\.yaml: unknown key 'trian'"):
        load_config(f)
    f.write_text("train:\n  batch_size: 16\n  micro_batch_size: 4\ndpo:\n  beta: 0.1\n")
    cfg = load_config(f, ["beta=0.5", "train.max_steps=3", "dpo.loss_type=ipo"])
    assert cfg["dpo"].beta == 0.5 and cfg["dpo"].loss_type == "ipo"
    assert cfg["train"].gradient_accumulation_steps == 4 and cfg["train"].max_steps == 3
    with pytest.raises(ValueError, match="loss_type must be one of"):
        load_config(f, ["dpo.loss_type=foo"])
