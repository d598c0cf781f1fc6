"""The embedded task: word and digit puzzles with checkable answers, generated from a seed.

Why this task. DPO learns from the *difference* between a chosen and a rejected answer; plain
SFT (and SFT on the chosen answers) imitates a whole answer, flaws included. So the
demonstrations come from a deliberately sloppy "teacher" with two failure modes:

* a **chatty habit**: most demonstrations open with a filler phrase ("Sure! ...") although
  every instruction asks for the bare answer. The judge penalizes it, but because the SFT
  model has the habit most of the time, many of the *best* of its K samples still carry it:
  imitating the chosen answers reinforces the habit, contrasting them with the rejected
  ones does not;
* **content slips**: some demonstrations swap two neighbouring words or miscount by one, so
  the SFT model is confident yet makes sampling errors at temperature 0.7.

Nothing is downloaded: every instruction, answer and demonstration comes from ``random.Random``
seeded by the caller, and the same seed always yields the same sets.

Families (one instruction each, answers are short token sequences the tiny model can learn):

* ``reverse``: "Reverse the words: fox sun cat" -> "cat sun fox"
* ``sort``:    "Sort the words alphabetically: sun cat fox" -> "cat fox sun"
* ``count``:   "How many words: cat sun fox dog" -> "4"
* ``sum``:     "Add the digits: 3 5 2" -> "10"

Scoring rubric (``score``; 1-10, correctness dominates, format and concision refine):

* 10: exactly the right answer and nothing else;
* 9:  the right answer with only surrounding whitespace or a trailing period;
* 7:  the right answer ends the response but extra words come first (the chatty habit);
  6 if that filler is longer than three words;
* 2-5: a wrong answer of the right kind; closer answers (same words in mostly the right order,
  a count or sum off by one) score higher; 1 less if chatty;
* 1:  empty, or nothing of the requested kind.

A response is *judged correct* (the accuracy the demo reports) when it scores >= 9: the right
answer in the requested form. ``content_correct`` ignores the chatty filler and is reported next
to it, so a gain from dropping the habit is never passed off as a gain in content.
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

WORDS = ("ant", "bee", "cat", "dog", "elk", "fox", "gnu", "hen", "ink", "jam", "kit", "log", "map",
         "nut", "owl", "pig", "rat", "sun", "toy", "urn", "van", "wig", "yak", "zoo")
FAMILIES = ("reverse", "sort", "count", "sum")
FILLERS = ("Sure! ", "Sure, here it is: ", "The answer is ")

CORRECT_THRESHOLD = 9  # score >= this is "judged correct"


@dataclass(frozen=True)
class Item:
    """One instruction with its reference answer."""
    family: str
    instruction: str
    answer: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TaskConfig:
    """Sizes and teacher sloppiness. Defaults are the demo's."""
    n_sft: int = 40000
    n_mine: int = 2000
    n_eval: int = 500
    habit_rate: float = 0.6     # share of demonstrations opening with a filler phrase
    slip_rate: float = 0.3      # share of demonstrations with one content slip
    min_words: int = 3
    max_words: int = 4
    families: tuple[str, ...] = ("reverse", "sort", "count")

    def __post_init__(self):
        for name in ("habit_rate", "slip_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"TaskConfig.{name} must be in [0, 1], got {v}")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"TaskConfig.families must be a non-empty subset of {FAMILIES}, "
                             f"got {self.families}")
        if not 2 <= self.min_words <= self.max_words <= len(WORDS):
            raise ValueError(f"TaskConfig needs 2 <= min_words <= max_words <= {len(WORDS)}, "
                             f"got {self.min_words}, {self.max_words}")
        for name in ("n_sft", "n_mine", "n_eval"):
            if getattr(self, name) < 0:
                raise ValueError(f"TaskConfig.{name} must be >= 0")


# -- generation -----------------------------------------------------------------------------
def make_item(rng: random.Random, family: str, min_words: int = 3, max_words: int = 5) -> Item:
    if family == "reverse":
        words = rng.sample(WORDS, rng.randint(min_words, max_words))
        return Item(family, "Reverse the words: " + " ".join(words), " ".join(reversed(words)))
    if family == "sort":
        words = rng.sample(WORDS, rng.randint(min_words, max_words))
        return Item(family, "Sort the words alphabetically: " + " ".join(words), " ".join(sorted(words)))
    if family == "count":
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words - 1, max_words + 2))]
        return Item(family, "How many words: " + " ".join(words), str(len(words)))
    if family == "sum":
        digits = [rng.randint(0, 9) for _ in range(rng.randint(min_words - 1, max_words - 1))]
        return Item(family, "Add the digits: " + " ".join(map(str, digits)), str(sum(digits)))
    raise ValueError(f"unknown task family {family!r}; choose one of {FAMILIES}")


def slip(rng: random.Random, item: Item) -> str:
    """A plausible wrong answer: two neighbouring words swapped, or a number off by one."""
    if item.family in ("reverse", "sort"):
        words = item.answer.split()
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
        return " ".join(words)
    n = int(item.answer)
    return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)


def demonstration(rng: random.Random, item: Item, habit_rate: float, slip_rate: float) -> str:
    """What the sloppy teacher writes for ``item``."""
    answer = slip(rng, item) if rng.random() < slip_rate else item.answer
    if rng.random() < habit_rate:
        answer = rng.choice(FILLERS) + answer
    return answer


@dataclass
class TaskData:
    sft: list[dict]          # {"instruction", "response", "answer", "family"}
    mine: list[Item]         # preference-mining prompts
    eval: list[Item]         # held-out evaluation prompts
    corpus: list[str]        # text for the tokenizer


def build(seed: int = 0, config: TaskConfig | None = None) -> TaskData:
    """Disjoint SFT / mining / eval sets (no instruction appears in two of them)."""
    cfg = config or TaskConfig()
    rng = random.Random(f"fastdpo-task-{seed}")
    total = cfg.n_sft + cfg.n_mine + cfg.n_eval
    seen: set[str] = set()
    items: list[Item] = []
    attempts = 0
    while len(items) < total:
        attempts += 1
        if attempts > 50 * total + 1000:
            raise ValueError(f"cannot draw {total} distinct instructions with {cfg}")
        item = make_item(rng, cfg.families[len(items) % len(cfg.families)], cfg.min_words, cfg.max_words)
        if item.instruction not in seen:
            seen.add(item.instruction)
            items.append(item)
    # Shuffle before splitting so every set gets every family in the same proportions.
    rng.shuffle(items)
    sft_items = items[:cfg.n_sft]
    mine = items[cfg.n_sft:cfg.n_sft + cfg.n_mine]
    evals = items[cfg.n_sft + cfg.n_mine:]
    sft = [dict(instruction=it.instruction, response=demonstration(rng, it, cfg.habit_rate, cfg.slip_rate),
                answer=it.answer, family=it.family) for it in sft_items]
    corpus = [f"{ex['instruction']}\n{ex['response']}\n" for ex in sft]
    corpus += [f"{f}{w}" for f in FILLERS for w in WORDS]  # every filler/word joint, even if rare
    return TaskData(sft=sft, mine=mine, eval=evals, corpus=corpus)


# -- judging --------------------------------------------------------------------------------
_INSTRUCTION = re.compile(
    r"^(Reverse the words|Sort the words alphabetically|How many words|Add the digits): (.+)$")
_FAMILY_OF = {"Reverse the words": "reverse", "Sort the words alphabetically": "sort",
              "How many words": "count", "Add the digits": "sum"}


def parse(instruction: str) -> Item:
    """Recover the reference answer from an instruction of this task."""
    m = _INSTRUCTION.match(instruction.strip())
    if not m:
        raise ValueError(f"not an instruction of the embedded task: {instruction[:80]!r}")
    family, arg = _FAMILY_OF[m.group(1)], m.group(2).split()
    if family == "reverse":
        answer = " ".join(reversed(arg))
    elif family == "sort":
        answer = " ".join(sorted(arg))
    elif family == "count":
        answer = str(len(arg))
    else:
        answer = str(sum(int(d) for d in arg))
    return Item(family, instruction.strip(), answer)


def _split_answer(response: str, family: str) -> tuple[str, str]:
    """(extra text before the answer, the answer part). The answer part is the longest tail
    made of tokens of the requested kind (task words, or one number)."""
    tokens = response.split()
    if family in ("count", "sum"):
        if tokens and tokens[-1].isdigit():
            return " ".join(tokens[:-1]), tokens[-1]
        return " ".join(tokens), ""
    i = len(tokens)
    while i > 0 and tokens[i - 1] in WORDS:
        i -= 1
    return " ".join(tokens[:i]), " ".join(tokens[i:])


def _closeness(family: str, got: str, want: str) -> float:
    """In [0, 1): how near a wrong answer is to the right one."""
    if family in ("count", "sum"):
        return 0.75 if abs(int(got) - int(want)) == 1 else 0.25
    g, w = got.split(), want.split()
    same_positions = sum(a == b for a, b in zip(g, w)) / max(len(w), len(g))
    same_words = len(set(g) & set(w)) / len(set(w) | set(g))
    return min(0.99, 0.5 * same_positions + 0.5 * same_words)


def score(instruction: str, response: str) -> int:
    """The rubric in the module docstring. Raises ValueError for a foreign instruction."""
    item = parse(instruction)
    text = response.strip()
    if text == item.answer:
        return 10
    if text.rstrip(".").strip() == item.answer:
        return 9
    extra, got = _split_answer(text.rstrip("."), item.family)
    if not got:
        return 1
    if got == item.answer:
        return 6 if len(extra.split()) > 3 else 7
    return max(2, 2 + round(3 * _closeness(item.family, got, item.answer)) - (1 if extra else 0))


def content_correct(instruction: str, response: str) -> bool:
    """The right answer ends the response, whatever filler precedes it."""
    return content_correct_score(score(instruction, response))


def judged_correct(instruction: str, response: str) -> bool:
    return score(instruction, response) >= CORRECT_THRESHOLD


def content_correct_score(s: int) -> bool:
    """A score that means "the right answer ends the response" (filler allowed)."""
    return s >= 6


def is_chatty(response: str) -> bool:
    """The response opens with one of the teacher's filler phrases (the habit the judge penalizes)."""
    text = response.lstrip()
    return any(text.startswith(f.strip()) for f in FILLERS)


def demonstration_stats(sft: list[dict]) -> dict:
    """How sloppy the demonstrations actually are (for the demo's report)."""
    n = max(1, len(sft))
    return {"chatty": sum(is_chatty(ex["response"]) for ex in sft) / n,
            "content_correct": sum(content_correct(ex["instruction"], ex["response"]) for ex in sft) / n,
            "judged_correct": sum(judged_correct(ex["instruction"], ex["response"]) for ex in sft) / n}


def reference_pairs(items: list[Item], n: int, seed: int = 0) -> list[dict]:
    """``n`` pairs of (reference answer, a slipped answer) in the mining format. Only for smoke
    runs whose barely trained model yields no mined pairs: real runs mine from the model."""
    rng = random.Random(f"fastdpo-reference-pairs-{seed}")
    out = []
    for i in range(n):
        item = items[i % len(items)]
        rejected = slip(rng, item)
        out.append({"prompt": item.instruction, "chosen": item.answer, "rejected": rejected,
                    "score_chosen": score(item.instruction, item.answer),
                    "score_rejected": score(item.instruction, rejected), "source": "reference"})
    return out


def make_judge(**_kw):
    """The ``task`` judge (entry point ``fastdpo.judges``): this task's programmatic checker."""
    from fastdpo.generation.judge import ProgrammaticJudge
    return ProgrammaticJudge(score, name="task")
