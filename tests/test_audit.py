"""``fastdpo audit``: planted problems are found exactly, --write-clean removes them, every format
train reads is audited alike, token lengths and limits agree with training's own tokenization."""
import itertools
import json
import math
import random
import statistics

import pytest

from fastdpo.cli import main
from fastdpo.generation.judge import ProgrammaticJudge
from fastdpo.models.tokenizer import Tokenizer, open_tokenizer
from fastdpo.training import data as data_mod
from fastdpo.training.audit import audit_preferences, near_identical, normalize
from fastdpo.training.batches import tokenize_pairs
from fastdpo.training.data import DataStats, load_examples

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def planted(seed=0):
    """Rows with a known number of every class; the rest are unrelated answers of unequal length."""
    rng = random.Random(seed)
    rows, expect = [], {"formatting_only": 0, "near_identical": 0, "duplicate_pairs": 0, "contradictions": 0,
                        "duplicate_prompts": 0, "bad_rows": 0, "chosen_longer": 0}

    def add(prompt, chosen, rejected):
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        expect["chosen_longer"] += len(chosen) > len(rejected)

    for i in range(60):   # clean pairs: chosen longer in the first 45
        long, short = words(rng, 40), words(rng, 12)
        add(f"question {i}: {words(rng, 5)}?", *((long, short) if i < 45 else (short, long)))
    for i in range(7):    # formatting only: case, markdown, punctuation, whitespace
        text = words(rng, 20)
        add(f"format {i}?", f"**{text.capitalize()}.**", f"{text}\n")
        expect["formatting_only"] += 1
    for i in range(5):    # near-identical: one word changed in a long answer
        ws = words(rng, 60).split()
        edited = list(ws)
        edited[30] = "zzzzz"
        add(f"near {i}?", " ".join(ws), " ".join(edited))
        expect["near_identical"] += 1
    for i in range(3):    # near-identical: three scattered word swaps in a long answer
        ws = [f"{w}{k}" for k, w in enumerate(words(rng, 80).split())]
        edited = list(ws)
        for k in (5, 40, 75):
            edited[k] = f"other{k}"
        add(f"scattered {i}?", " ".join(ws), " ".join(edited))
        expect["near_identical"] += 1
    for i in range(4):    # exact copies of earlier clean rows
        rows.append(dict(rows[i]))
        expect["duplicate_pairs"] += 1
        expect["duplicate_prompts"] += 1
        expect["chosen_longer"] += 1
    for i in (10, 11, 50):   # swapped labels of earlier rows: both rows count
        r = rows[i]
        add(r["prompt"], r["rejected"], r["chosen"])
        expect["contradictions"] += 2
        expect["duplicate_prompts"] += 1
    for i in (20, 21):    # the same prompt with a different, consistent pair
        add(rows[i]["prompt"], words(rng, 30), words(rng, 9))
        expect["duplicate_prompts"] += 1
    bad = ['{"prompt": "broken json', {"prompt": "no rejected", "chosen": "x"},
           {"prompt": "same", "chosen": "same answer", "rejected": "same answer "}]
    expect["bad_rows"] = len(bad)
    good = len(rows)
    rows = rows[:30] + bad + rows[30:]
    return rows, expect, good


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([words(random.Random(1), 400)] * 5 + ["question format near scattered other"],
                           vocab_size=400)


def test_near_identical_and_normalize():
    rng = random.Random(3)
    a = words(rng, 50)
    assert near_identical(a, a[:100] + "X" + a[101:])                     # one character
    assert near_identical(a, a + " yes")                                   # a short tail added
    assert not near_identical(a, words(rng, 50))                           # unrelated, same length
    assert not near_identical("57", "58") and not near_identical("ok", "no")
    assert not near_identical(a, a[: len(a) // 2])                         # much shorter
    assert normalize("**Hello,  World!**\n") == normalize("hello world") == b"helloworld"
    assert normalize("# Title\n- item") == normalize("title item")


def test_planted_problems_are_found_exactly_and_write_clean_removes_them(tmp_path):
    rows, expect, good = planted()
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    r = audit_preferences([path], json_path=tmp_path / "audit.json", write_clean=tmp_path / "clean.jsonl")
    assert r["rows"] == len(rows) and r["good_rows"] == good and r["bad_rows"] == expect["bad_rows"]
    for key in ("formatting_only", "near_identical", "duplicate_pairs", "contradictions",
                "duplicate_prompts"):
        assert r[key] == expect[key], key
    assert r["length_bias"]["chosen_longer_fraction"] == pytest.approx(expect["chosen_longer"] / good)
    assert r["length_unit"] == "chars" and r["limits"] is None
    assert any(f"{path}:31:" in e for e in r["bad_row_errors"])           # the same file:line as train
    on_disk = json.loads((tmp_path / "audit.json").read_text())
    assert on_disk["length_bias"]["chosen_longer_fraction"] == r["length_bias"]["chosen_longer_fraction"]

    # every planted row goes: formatting-only, near-identical, later copies, both sides of a swap
    removed = expect["formatting_only"] + expect["near_identical"] + expect["duplicate_pairs"] \
        + expect["contradictions"]
    assert r["clean"]["kept"] == good - removed
    again = audit_preferences([tmp_path / "clean.jsonl"])
    assert again["rows"] == good - removed and again["bad_rows"] == 0
    for key in ("formatting_only", "near_identical", "duplicate_pairs", "contradictions"):
        assert again[key] == 0, key
    kept = [json.loads(ln) for ln in (tmp_path / "clean.jsonl").read_text().splitlines()]
    assert kept[0] == rows[0]                                              # rows as read, in order


def test_duplicates_and_contradictions_in_one_group(tmp_path):
    rows = [("p", "alpha", "beta"), ("p", "alpha", "beta"), ("p", "beta", "alpha"), ("q", "alpha", "beta"),
            ("q", "gamma", "delta"), ("q", "delta", "gamma"), ("q", "delta", "gamma")]
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in rows])
    r = audit_preferences([path], write_clean=tmp_path / "d.jsonl", drop=["duplicates"])
    assert (r["duplicate_pairs"], r["contradictions"], r["distinct_prompts"]) == (2, 6, 2)
    kept = [json.loads(ln) for ln in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [(k["prompt"], k["chosen"]) for k in kept] == [("p", "alpha"), ("p", "beta"), ("q", "alpha"),
                                                          ("q", "gamma"), ("q", "delta")]
    audit_preferences([path], write_clean=tmp_path / "c.jsonl", drop=["contradictions"])
    kept = [json.loads(ln) for ln in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert kept == [{"prompt": "q", "chosen": "alpha", "rejected": "beta"}]


def test_drop_only_the_named_classes(tmp_path):
    rows, expect, good = planted()
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    r = audit_preferences([path], write_clean=tmp_path / "clean.jsonl", drop=["duplicates"])
    assert r["clean"]["kept"] == good - expect["duplicate_pairs"]
    assert r["clean"]["dropped_by_class"] == {"bad_rows": 3, "duplicates": expect["duplicate_pairs"]}
    with pytest.raises(ValueError, match="unknown class 'typos'"):
        audit_preferences([path], write_clean=tmp_path / "x.jsonl", drop=["typos"])


def test_every_format_train_reads_is_audited_alike(tmp_path, tok):
    rows, _, _ = planted()
    # HH transcripts strip each turn, so the other formats get stripped answers too
    rows = [{**r, "chosen": r["chosen"].strip(), "rejected": r["rejected"].strip()} for r in rows
            if isinstance(r, dict) and "rejected" in r and r["chosen"].strip() != r["rejected"].strip()]
    prompt = write_jsonl(tmp_path / "p.jsonl", rows)
    conv = tmp_path / "c.json"
    conv.write_text(json.dumps([{"conversations": [{"from": "user", "value": r["prompt"]}],
                                 "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows], indent=1))
    hh = write_jsonl(tmp_path / "h.jsonl", [
        {"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['chosen']}",
         "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['rejected']}"} for r in rows])
    reports = [audit_preferences([p], tokenizer=tok) for p in (prompt, conv, hh)]
    assert [list(r["formats"]) for r in reports] == [["prompt"], ["conversations"], ["hh"]]
    keys = ("good_rows", "formatting_only", "near_identical", "duplicate_pairs", "contradictions",
            "duplicate_prompts", "lengths", "length_bias")
    for r in reports[1:]:
        assert {k: r[k] for k in keys} == {k: reports[0][k] for k in keys}
    both = audit_preferences([prompt, conv])
    assert both["formats"] == {"prompt": len(rows), "conversations": len(rows)}
    assert both["duplicate_pairs"] == len(rows) + reports[0]["duplicate_pairs"]


def test_token_lengths_and_limits_match_training(tmp_path, tok):
    rows, _, _ = planted()
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    examples = load_examples([path], on_error="skip")
    prompts = sorted(len(tok.render_conversation(ex.turns)) for ex in examples)
    answers = sorted(len(tok.render_answer(ex.chosen)) for ex in examples)
    p50, a50 = prompts[len(prompts) // 2], answers[len(answers) // 2]
    seen = set()
    # max_length is prompt + answer (as in SFT and TRL); max_completion_length caps the answer alone
    grid = itertools.product((p50 + a50 - 1, p50 + a50, 10**4), (p50 - 1, p50, 10**4),
                             (p50 + a50, p50 + a50 + 1, None), (a50 - 1, None))
    for max_length, max_prompt, block, max_answer in grid:
        r = audit_preferences([path], tokenizer=tok, max_length=max_length, max_prompt_length=max_prompt,
                              block_size=block, max_completion_length=max_answer)
        stats = DataStats()
        tokenize_pairs(examples, tok, max_length, max_prompt, block or 10**9, stats, max_answer)
        assert r["limits"]["dropped_long_prompt"] == stats.dropped_long_prompt
        assert r["limits"]["truncated"] == stats.truncated
        seen.add((stats.dropped_long_prompt, stats.truncated))
    assert len(seen) > 5   # the grid crosses every boundary
    full = [(tok.render_conversation(ex.turns), tok.render_answer(ex.chosen), tok.render_answer(ex.rejected))
            for ex in examples]
    assert r["length_unit"] == "tokens"
    assert r["lengths"]["chosen"]["max"] == max(len(c) for _, c, _ in full)
    assert r["lengths"]["prompt"]["mean"] == pytest.approx(sum(len(p) for p, _, _ in full) / len(full))
    longer = sum(len(c) > len(rj) for _, c, rj in full) / len(full)
    assert r["length_bias"]["chosen_longer_fraction"] == pytest.approx(longer)
    # streaming summaries (counts per length, a fine ratio histogram) against the direct ones
    for i, name in enumerate(("prompt", "chosen", "rejected")):
        xs = sorted(len(row[i]) for row in full)
        for q in (50, 90, 99):   # nearest rank
            assert r["lengths"][name][f"p{q}"] == xs[math.ceil(q / 100 * len(xs)) - 1]
        assert r["lengths"][name]["min"] == xs[0]
    ratios = [len(c) / len(rj) for _, c, rj in full]
    assert r["length_bias"]["mean_ratio"] == pytest.approx(sum(ratios) / len(ratios))
    assert r["length_bias"]["median_ratio"] == pytest.approx(statistics.median_low(ratios), rel=3e-3)


def test_token_counts_without_ids_equal_rendered_lengths(tok):
    convs = [[("user", "hi there")], [("user", "a"), ("assistant", "b c"), ("user", "d\né <|end|>")],
             [("human", "x" * 50)], [("user", "it's 12,000 ünïcode ✓\t\n  spaces   end ")],
             [("system", "be brief"), ("user", "hi"), ("assistant", "ok"), ("system", "and kind"),
              ("user", "again")]]
    assert tok.conversation_lengths(convs) == [len(tok.render_conversation(c)) for c in convs]
    answers = ["", "one two", "ünïcode ✓ 中文 ٣²½", "<|end|> stays text", " lead and trail  ", "a\u2028b"]
    assert tok.answer_lengths(answers) == [len(tok.render_answer(a)) for a in answers]


def test_fast_token_counts_split_like_the_tokenizer_on_all_of_unicode(tok):
    """The Python pre-tokenizer regex gives the tokenizer's own pre-token spans on random text drawn
    from every assigned code point (and ASCII look-alikes), and the counts equal len(encode)."""
    import unicodedata

    from fastdpo.models.token_count import _patterns, splits_like_gpt2

    assert splits_like_gpt2(tok._hf)
    ascii_, bmp, outside = _patterns()
    rng = random.Random(0)
    assigned = [chr(cp) for cp in range(0x10000) if unicodedata.category(chr(cp)) not in ("Cn", "Cs")]
    common = list("abc XYZ 019 \t\n\r\x0b\x1c  ,.!?'s're'll -_éß中文٣²½\u00a0\u2003\u3000")
    texts = ["".join(rng.choice(assigned) if rng.random() < 0.4 else rng.choice(common) for _ in range(30))
             for _ in range(1500)]
    texts += ["".join(rng.choice(common[:40]) for _ in range(30)) for _ in range(300)]   # ASCII only
    for t in texts:
        split = ascii_ if t.isascii() else bmp
        assert not outside.search(t)
        theirs = [span for _, span in tok._hf.pre_tokenizer.pre_tokenize_str(t)]
        assert [m.span() for m in split.finditer(t)] == theirs
    texts += ["emoji 😀 past the BMP", "unassigned \u0378 code point", "🙂"]
    assert tok.count_tokens(texts) == [len(tok.encode(t)) for t in texts]
    assert tok.count_tokens(texts) == [len(tok.encode(t)) for t in texts]     # again, from the cache


def test_a_hugging_face_tokenizer_counts_as_it_renders(tmp_path):
    from hf_helpers import save_tokenizer

    directory = save_tokenizer(tmp_path / "chatml", "chatml")
    rows, _, _ = planted()
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    r = audit_preferences([path], tokenizer=directory, max_length=20, max_prompt_length=40)
    hf = open_tokenizer(directory)
    examples = load_examples([path], on_error="skip")
    full = [(hf.render_conversation(ex.turns), hf.render_answer(ex.chosen), hf.render_answer(ex.rejected))
            for ex in examples]
    assert r["lengths"]["prompt"]["mean"] == pytest.approx(sum(len(p) for p, _, _ in full) / len(full))
    assert r["lengths"]["rejected"]["max"] == max(len(x) for _, _, x in full)
    stats = DataStats()
    tokenize_pairs(examples, hf, 20, 40, 10**9, stats)
    assert (r["limits"]["dropped_long_prompt"], r["limits"]["truncated"]) == (stats.dropped_long_prompt,
                                                                              stats.truncated)


def test_label_consistency_with_a_position_swapped_judge(tmp_path):
    rows, expect, good = planted()
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    longer_wins = ProgrammaticJudge(lambda q, a: min(10, 1 + len(a) // 20), name="longer")
    r = audit_preferences([path], judge=longer_wins, judge_sample=1000)
    lc = r["label_consistency"]
    assert lc["sampled"] == good
    assert lc["agree"] + lc["disagree"] + lc["undecided"] == good
    # a judge that prefers length agrees with exactly the labels where chosen is clearly longer
    examples = load_examples([path], on_error="skip")
    score = [(min(10, 1 + len(e.chosen) // 20), min(10, 1 + len(e.rejected) // 20)) for e in examples]
    assert lc["agree"] == sum(a > b for a, b in score) and lc["disagree"] == sum(a < b for a, b in score)
    sampled = audit_preferences([path], judge=longer_wins, judge_sample=10, seed=1)["label_consistency"]
    assert sampled["sampled"] == 10


def test_jsonl_is_streamed_not_read_whole(tmp_path, monkeypatch):
    rows, _, good = planted()
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)

    def refuse(*a, **k):
        raise AssertionError("a JSONL file was read whole")

    monkeypatch.setattr(data_mod.Path, "read_text", refuse)
    monkeypatch.setattr(data_mod.Path, "read_bytes", refuse)
    assert audit_preferences([path])["good_rows"] == good
    first = next(data_mod.read_records(path))
    assert first[0] == 1 and first[1] == rows[0]


def test_cli_writes_table_json_png_and_clean_copy(tmp_path, tok, capsys):
    rows, expect, good = planted()
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    tok_path = tok.save(tmp_path / "tokenizer.json")
    out = tmp_path / "out"
    assert main(["audit", str(path), "--tokenizer", str(tok_path), "--json", str(out / "a.json"),
                 "--png", str(out / "a.png"), "--write-clean", str(out / "clean.jsonl"),
                 "--drop", "duplicates,contradictions", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "lengths in tokens" in text and "contradictions" in text and "clean copy" in text
    r = json.loads((out / "a.json").read_text())
    for key in ("rows", "bad_rows", "formatting_only", "near_identical", "duplicate_pairs", "contradictions"):
        assert isinstance(r[key], int)
    assert 0 < r["length_bias"]["chosen_longer_fraction"] < 1
    assert (out / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert r["clean"]["kept"] == good - expect["duplicate_pairs"] - expect["contradictions"]
    assert main(["audit", str(tmp_path / "missing.jsonl")]) == 2
    assert "fastdpo audit: error: data file not found" in capsys.readouterr().err
