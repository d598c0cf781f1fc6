import random

import pytest

from fastdpo.demo import task
from fastdpo.demo.task import TaskConfig, build, parse, score

SMALL = TaskConfig(n_sft=3000, n_mine=400, n_eval=300)


@pytest.fixture(scope="module")
def data():
    return build(7, SMALL)


def test_sets_are_disjoint_and_sized(data):
    sft = {ex["instruction"] for ex in data.sft}
    mine = {it.instruction for it in data.mine}
    ev = {it.instruction for it in data.eval}
    assert (len(sft), len(mine), len(ev)) == (3000, 400, 300)   # no duplicates inside a set
    assert not sft & mine and not sft & ev and not mine & ev


def test_same_seed_same_data_other_seed_other_data(data):
    again = build(7, SMALL)
    assert again.sft == data.sft and again.mine == data.mine and again.eval == data.eval
    assert again.corpus == data.corpus
    other = build(8, SMALL)
    assert [it.instruction for it in other.eval] != [it.instruction for it in data.eval]


def test_every_family_in_every_set(data):
    for items in (data.mine, data.eval):
        assert {it.family for it in items} == set(SMALL.families)
    assert {ex["family"] for ex in data.sft} == set(SMALL.families)


def test_reference_answers_are_right_and_score_10(data):
    for it in data.eval:
        assert parse(it.instruction) == it
        assert score(it.instruction, it.answer) == 10


def test_demonstrations_carry_the_configured_sloppiness(data):
    stats = task.demonstration_stats(data.sft)
    assert abs(stats["chatty"] - SMALL.habit_rate) < 0.04
    assert abs(stats["content_correct"] - (1 - SMALL.slip_rate)) < 0.04
    assert abs(stats["judged_correct"] - (1 - SMALL.habit_rate) * (1 - SMALL.slip_rate)) < 0.04
    clean = build(7, TaskConfig(n_sft=500, n_mine=10, n_eval=10, habit_rate=0.0, slip_rate=0.0))
    assert all(ex["response"] == ex["answer"] for ex in clean.sft)


def test_corpus_covers_instructions_and_fillers(data):
    text = "\n".join(data.corpus)
    assert data.sft[0]["instruction"] in text
    for filler in task.FILLERS:
        assert filler.strip() in text
    # Eval prompts never leak into the tokenizer corpus.
    lines = set(text.splitlines())
    assert not any(it.instruction in lines for it in data.eval)


@pytest.mark.parametrize("response,expected", [
    ("fox sun cat", 10),                 # exact
    ("  fox sun cat\n", 10),             # surrounding whitespace is not a format error
    ("fox sun cat.", 9),                 # trailing period
    ("Sure! fox sun cat", 7),            # chatty habit, right answer
    ("The answer is fox sun cat", 7),
    ("Sure, here it is: fox sun cat", 6),  # a filler of more than three words: less concise
    ("sun fox cat", 4),                  # one swap: same words, one position right
    ("Sure! sun fox cat", 3),            # wrong and chatty
    ("cat sun fox", 4),                  # the unreversed input: same words, one position right
    ("fox", 3),                          # a fragment
    ("dog elk ant", 2),                  # right kind, nothing in common
    ("", 1),                             # empty
    ("42", 1),                           # wrong kind
])
def test_reverse_rubric(response, expected):
    assert score("Reverse the words: cat sun fox", response) == expected


@pytest.mark.parametrize("response,expected", [
    ("4", 10), ("4.", 9), ("Sure! 4", 7), ("Sure, here it is: 4", 6),
    ("5", 4), ("3", 4), ("7", 3), ("Sure! 5", 3), ("four", 1), ("", 1),
])
def test_count_rubric(response, expected):
    assert score("How many words: cat cat sun fox", response) == expected


def test_sort_and_sum_answers():
    assert score("Sort the words alphabetically: sun cat fox", "cat fox sun") == 10
    assert score("Sort the words alphabetically: sun cat fox", "cat sun fox") < 6
    assert score("Add the digits: 3 5 2", "10") == 10
    assert score("Add the digits: 3 5 2", "11") == 4


def test_correctness_dominates_format():
    """Every right answer, however chatty, outscores every wrong one, however terse."""
    rng = random.Random(0)
    for _ in range(200):
        it = task.make_item(rng, rng.choice(task.FAMILIES))
        right = [score(it.instruction, f + it.answer) for f in ("", *task.FILLERS)]
        wrong = [score(it.instruction, f + task.slip(rng, it)) for f in ("", *task.FILLERS)]
        assert min(right) > max(wrong)


def test_foreign_instruction_is_a_clear_error():
    with pytest.raises(ValueError, match="not an instruction of the embedded task"):
        score("Write a poem about the sea", "waves")


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="habit_rate"):
        TaskConfig(habit_rate=1.5)
    with pytest.raises(ValueError, match="families"):
        TaskConfig(families=("reverse", "poetry"))
    with pytest.raises(ValueError, match="distinct instructions"):
        build(0, TaskConfig(n_sft=1000, n_mine=10, n_eval=10, families=("reverse",),
                            min_words=2, max_words=2))


def test_registered_task_judge_uses_this_rubric():
    from fastdpo.generation.judge import make_judge
    judge = make_judge("task")
    assert judge.score("Reverse the words: cat sun fox", "fox sun cat") == 10
    assert judge.compare("Reverse the words: cat sun fox", "Sure! fox sun cat", "fox sun cat") == "B"


def test_reference_pairs_prefer_the_reference(data):
    pairs = task.reference_pairs(data.mine, 20, seed=1)
    assert len(pairs) == 20
    assert all(p["score_chosen"] == 10 and p["score_rejected"] < 6 for p in pairs)
