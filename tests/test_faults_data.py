"""Hostile data files: each bad row is a bad row (file:line, honouring on_error), never a traceback
or a silently misread file."""
import json

import pytest

from fastdpo.cli import main as cli_main
from fastdpo.models.tokenizer import Tokenizer
from fastdpo.training.batches import tokenize_pairs
from fastdpo.training.data import DataError, DataStats, load_examples

ROWS = [{"prompt": f"what is {i}?", "chosen": f"{i}", "rejected": f"not {i}"} for i in range(6)]


def lines(rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["what is 0123456789 not ? yes no"] * 20, vocab_size=300)


@pytest.mark.parametrize("bad,reason", [
    ('{"prompt": "q", "chosen": "\\ud800", "rejected": "no"}', "lone UTF-16 surrogate"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "meta": ' + "[" * 5000 + "]" * 5000 + "}", "nested"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "m": ' + "[" * 80 + "]" * 80 + "}", "nested"),
], ids=["surrogate", "recursion", "deep"])
def test_surrogates_and_deep_nesting_are_bad_rows(tmp_path, bad, reason):
    f = tmp_path / "d.jsonl"
    f.write_text(lines([ROWS[0], bad, ROWS[1]]))
    with pytest.raises(DataError, match=rf"d.jsonl:2: .*{reason}"):
        load_examples([f])
    stats = DataStats()
    assert len(load_examples([f], on_error="skip", stats=stats)) == 2 and stats.skipped == 1


def test_a_jsonl_file_whose_first_row_is_an_array_stays_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(lines([json.dumps([1, 2]), *ROWS]))
    stats = DataStats()
    assert len(load_examples([f], on_error="skip", stats=stats)) == len(ROWS)
    assert stats.skipped == 1 and "d.jsonl:1" in stats.errors[0]
    # without a telling extension, the whole content decides: not one array, so JSONL
    g = tmp_path / "d.txt"
    g.write_text(f.read_text())
    assert len(load_examples([g], on_error="skip")) == len(ROWS)
    h = tmp_path / "a.data"
    h.write_text(json.dumps(ROWS, indent=1))
    assert len(load_examples([h])) == len(ROWS)


def test_content_after_a_json_array_is_an_error(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps(ROWS[:2], indent=1) + "\n" + json.dumps(ROWS[2]) + "\n")
    with pytest.raises(DataError, match=r"d.json:\d+: content after the end of the JSON array"):
        load_examples([f], on_error="skip")


def test_a_byte_that_is_not_utf8_is_a_bad_row_with_its_line(tmp_path):
    name = "d.json"
    text = json.dumps(ROWS[:3], indent=1).encode()
    at = text.index(b"not 1")
    f = tmp_path / name
    f.write_bytes(text[:at] + b"\xff\xfe" + text[at:])
    line = text[:at].count(b"\n") + 1
    with pytest.raises(DataError, match=rf"{name}:\d+: not valid UTF-8"):
        load_examples([f])
    stats = DataStats()
    got = load_examples([f], on_error="skip", stats=stats)
    assert [e.chosen for e in got] == ["0", "2"] and stats.skipped == 1
    assert "not valid UTF-8" in stats.errors[0] and str(line) in stats.errors[0]


def test_pairs_identical_after_the_cut_are_dropped_and_counted(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text(lines([{"prompt": "q", "chosen": "yes yes yes yes 1", "rejected": "yes yes yes yes 2"},
                        {"prompt": "q", "chosen": "1", "rejected": "2"}]))
    stats = DataStats()
    pairs = tokenize_pairs(load_examples([f]), tok, max_length=64, max_prompt_length=32, block_size=64,
                           stats=stats, max_completion_length=3)
    assert len(pairs) == 1 and stats.identical_after_cut == 1
    assert "1 pairs dropped because chosen and rejected were identical" in stats.summary()


def test_the_cli_reports_a_bad_data_file_in_one_line(tmp_path, capsys):
    f = tmp_path / "d.json"
    f.write_text(json.dumps(ROWS) + "\n{}\n")
    assert cli_main(["audit", str(f)]) == 2
    err = capsys.readouterr().err
    errors = [part for part in err.replace("\r", "\n").splitlines() if "error" in part]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("fastdpo audit: error: ") and "d.json:" in errors[0]
    assert "FASTDPO_TRACEBACK=1" in errors[0]
