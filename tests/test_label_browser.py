"""The labeling page in a real browser: headless Chromium (the system's, e.g. Debian's ``chromium``)
driven by Playwright labels with clicks and with keys, writes a note, undoes, asks a free-form prompt,
and works in two tabs at once; then the JSONL is checked against what the page showed.

Skips, saying why, when Playwright or a system Chromium is missing. ``FASTDPO_SCREENSHOTS=DIR``
also saves the README's screenshots there."""
import json
import os
import shutil
from pathlib import Path

import pytest

from fastdpo.bench.judge import make_tiny_checkpoint
from fastdpo.generation.label.answers import Answerer
from fastdpo.generation.label.app import LabelServer
from fastdpo.generation.label.session import LabelSession
from fastdpo.generation.label.sources import candidate_items
from fastdpo.generation.label.store import LabelStore, other_path
from fastdpo.training.data import load_examples

SKIP = "browser test skipped: "
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip(SKIP + "Playwright is not installed (pip install -e '.[dev]')", allow_module_level=True)
CHROMIUM = os.environ.get("FASTDPO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip(SKIP + "no system Chromium (apt-get install chromium)", allow_module_level=True)

KEY = "page-key-42"
CANDIDATES = [
    ("What is 17 + 25?", "17 + 25 = 42.", "17 + 25 is 32, because 7 + 5 = 12 and 1 + 2 = 3."),
    ("Name the largest planet in the solar system.", "Jupiter.",
     "The largest planet is Saturn, famous for its rings."),
    ("Reverse the words: cat dog fox", "fox dog cat", "tac god xof"),
    ("Is 91 a prime number?", "No: 91 = 7 x 13.", "Yes, 91 is prime."),
    ("Sort alphabetically: pear apple fig", "apple fig pear", "apple pear fig"),
]


@pytest.fixture
def served(tmp_path, one_thread):
    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                             for p, c, r in CANDIDATES))
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", block_size=64)
    session = LabelSession(candidate_items(cands), LabelStore(tmp_path / "labels.jsonl"),
                           Answerer(ckpt, max_new_tokens=8, temperature=1.0))
    srv = LabelServer(session, port=0, api_key=KEY).start_in_thread()
    yield srv, tmp_path / "labels.jsonl"
    srv.stop()


@pytest.fixture
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def shown(page) -> dict:
    page.wait_for_function("document.body.dataset.item")
    return {"id": page.evaluate("document.body.dataset.item"), "A": page.inner_text("#answer-a"),
            "B": page.inner_text("#answer-b"), "prompt": page.inner_text("#prompt-view")}


def after(page, item_id: str) -> None:
    """Wait until the page shows another item than ``item_id`` (or none)."""
    page.wait_for_function(f"document.body.dataset.item !== {json.dumps(item_id)}")


def screenshot(page, name: str) -> None:
    out = os.environ.get("FASTDPO_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(out) / name), full_page=True)


def test_label_with_clicks_keys_note_undo_free_prompt_and_two_tabs(served, browser):
    srv, out = served
    ctx = browser.new_context(viewport={"width": 1100, "height": 600})
    page = ctx.new_page()
    page.goto(srv.url + f"?key={KEY}")
    first = shown(page)
    assert "key=" not in page.url                       # the key leaves the address bar
    assert page.inner_text("#progress") == "0 of 5 labelled"
    page.fill("#annotator", "ada")
    page.dispatch_event("#annotator", "change")
    screenshot(page, "label-page.png")
    made = {}

    page.click("#btn-a")                                # 1: a click
    after(page, first["id"])
    made[first["id"]] = ("A", first)
    second = shown(page)
    page.keyboard.press("2")                            # 2: a key
    after(page, second["id"])
    made[second["id"]] = ("B", second)
    third = shown(page)
    page.keyboard.press("n")                            # 3: a note, then Tie by key
    page.keyboard.type("both fine")
    page.keyboard.press("Escape")
    page.keyboard.press("t")
    after(page, third["id"])
    page.keyboard.press("u")                            # undo brings the tie back with its note
    page.wait_for_function(f"document.body.dataset.item === {json.dumps(third['id'])}")
    assert page.input_value("#note") == "both fine"
    page.wait_for_selector("#status.ok")
    assert "undone: Tie" in page.inner_text("#status")
    screenshot(page, "label-undo.png")
    page.keyboard.press("b")                            # ... and is labelled again, now B
    after(page, third["id"])
    made[third["id"]] = ("B", third)

    other = ctx.new_page()                              # a second tab (its own tab id)
    other.goto(srv.url + f"?key={KEY}")
    mine, theirs = shown(page), shown(other)
    assert mine["id"] != theirs["id"]                   # never the same pending item
    other.click("#btn-b")
    after(other, theirs["id"])
    made[theirs["id"]] = ("B", theirs)
    other.wait_for_function("document.getElementById('empty').textContent.includes('another tab')")
    page.keyboard.press("4")                            # skip
    after(page, mine["id"])
    made[mine["id"]] = ("skip", mine)
    page.wait_for_function("document.getElementById('empty').textContent.includes('All items')")
    assert page.inner_text("#progress") == "5 of 5 labelled"

    page.fill("#free-prompt", "Say something about foxes.")   # a free-form prompt, answered by the model
    page.keyboard.press("Control+Enter")
    free = shown(page)
    assert "Say something about foxes." in free["prompt"]
    page.click("#btn-b")
    after(page, free["id"])
    made[free["id"]] = ("B", free)
    page.wait_for_function("document.getElementById('progress').textContent.includes('+1 free-form')")
    ctx.close()

    rows = [json.loads(x) for p in (out, other_path(out)) for x in p.read_text().splitlines()]
    assert sorted(r["meta"]["item"] for r in rows) == sorted(made)        # one row per item, no duplicate
    for r in rows:
        choice, view = made[r["meta"]["item"]]
        assert r["meta"]["choice"] == choice and r["meta"]["annotator"] == "ada"
        assert r["conversations"][0]["value"] in view["prompt"]
        if choice in ("A", "B"):
            assert r["chosen"] == view[choice] and r["rejected"] == view["B" if choice == "A" else "A"]
        else:
            assert r["answers"] == {"A": view["A"], "B": view["B"]}
    assert {r["meta"]["note"] for r in rows} == {"", "both fine"}
    assert len(load_examples([out])) == 5                 # A/B choices, trainable as written
