"""``fastdpo label`` without a browser: sources, the durable store, tabs that never duplicate or lose
a row, undo, answers from checkpoints, access control, and 100 choices surviving SIGKILLs."""
import http.client
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fastdpo.bench.judge import make_tiny_checkpoint
from fastdpo.generation.label.answers import Answerer
from fastdpo.generation.label.app import LabelServer
from fastdpo.generation.label.session import LabelSession
from fastdpo.generation.label.sources import candidate_items, prompt_items
from fastdpo.generation.label.store import LabelStore, StoreBusy, other_path
from fastdpo.generation.openai_api import RequestError
from fastdpo.training.data import load_examples


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs_file(path: Path, n: int) -> Path:
    return write_jsonl(path, [{"prompt": f"Question {i}?", "chosen": f"good answer {i}",
                               "rejected": f"bad {i}",
                               "score_chosen": 8, "score_rejected": 2} for i in range(n)])


def session_for(tmp_path, n=6, **kw):
    items = candidate_items(pairs_file(tmp_path / "cands.jsonl", n))
    return LabelSession(items, LabelStore(tmp_path / "labels.jsonl"), **kw)


def shown(view):
    return {"A": view["a"], "B": view["b"]}


# -- sources -----------------------------------------------------------------------------------------
def test_candidates_from_pairs_k_samples_and_conversations(tmp_path):
    rows = [
        {"prompt": "p0", "chosen": "c0", "rejected": "r0", "score_chosen": 9},
        {"prompt": "p0", "chosen": "c0", "rejected": "r0", "score_chosen": 9},          # a duplicate
        {"prompt": "p1", "responses": ["x", "y", "x", "z"]},
        {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"},
                           {"from": "user", "value": "more"}], "chosen": "ok", "rejected": "no"},
    ]
    items = candidate_items(write_jsonl(tmp_path / "c.jsonl", rows), seed=3)
    assert len(items) == 3
    assert items[0].answers == ("c0", "r0") and items[0].origins == ("chosen", "rejected")
    assert items[0].extra == {"score_chosen": 9}
    assert set(items[1].answers) <= {"x", "y", "z"} and len(set(items[1].answers)) == 2
    assert items[1].origins[0].startswith("sample ")
    assert items[2].turns == [("user", "hi"), ("assistant", "yo"), ("user", "more")]
    again = candidate_items(tmp_path / "c.jsonl", seed=3)
    assert [(i.id, i.flip, i.answers) for i in again] == [(i.id, i.flip, i.answers) for i in items]
    flips = [it.flip for it in candidate_items(pairs_file(tmp_path / "many.jsonl", 40))]
    assert 5 < sum(flips) < 35                       # sides are randomised per item
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["same", "same"]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*two different"):
        candidate_items(tmp_path / "bad.jsonl")


def test_prompt_items_from_an_interaction_log_are_sampled_and_deduplicated(tmp_path):
    log = write_jsonl(tmp_path / "log.jsonl", [
        {"request_id": str(i), "choices": [], "messages": [{"role": "user", "content": f"q{i % 5}"}]}
        for i in range(20)])
    items = prompt_items(log, {"model-a": "A", "model-b": "B"}, n=3, seed=1)
    assert len(items) == 3 and len({tuple(i.turns) for i in items}) == 3
    again = prompt_items(log, {"model-a": "A", "model-b": "B"}, n=3, seed=1)
    assert [i.id for i in items] == [i.id for i in again]
    assert len(prompt_items(log, {"model-a": "A", "model-b": "B"})) == 5
    other = prompt_items(log, {"model-a": "A", "model-b": "C"})
    assert {i.id for i in other}.isdisjoint(i.id for i in items)   # other models: other items


# -- the store ---------------------------------------------------------------------------------------
def test_store_is_private_resumes_cuts_a_torn_line_and_has_one_writer(tmp_path):
    out = tmp_path / "labels.jsonl"
    store = LabelStore(out)
    row = {"conversations": [{"from": "user", "value": "q"}], "chosen": "a", "rejected": "b",
           "meta": {"item": "i1", "choice": "A"}}
    store.append(row)
    store.append({"conversations": [], "answers": {"A": "x", "B": "y"},
                  "meta": {"item": "i2", "choice": "tie"}})
    for p in (out, other_path(out)):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    with pytest.raises(StoreBusy, match="another fastdpo label"):
        LabelStore(out)
    store.close()
    with open(out, "ab") as f:
        f.write(b'{"conversations": [], "chosen": "torn')     # a kill in the middle of an append
    again = LabelStore(out)
    assert set(again.done) == {"i1", "i2"} and out.read_bytes().endswith(b"}\n")
    assert again.remove("i1")["meta"]["choice"] == "A" and out.read_text() == ""
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600     # the rewrite stays private
    again.close()
    (tmp_path / "foreign.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(ValueError, match=r"foreign.jsonl:1: not a label row"):
        LabelStore(tmp_path / "foreign.jsonl")


# -- the session -------------------------------------------------------------------------------------
def test_two_tabs_never_share_an_item_and_no_choice_is_written_twice(tmp_path):
    s = session_for(tmp_path, n=3)
    one, two = s.next("tab1")["item"], s.next("tab2")["item"]
    assert one["id"] != two["id"]
    assert s.next("tab1")["item"]["id"] == one["id"]           # a reload shows the same item
    with pytest.raises(RequestError, match="open in another tab"):
        s.choose("tab2", one["id"], "A")
    assert s.choose("tab1", one["id"], "A")["duplicate"] is False
    assert s.choose("tab1", one["id"], "A")["duplicate"] is True   # a retry is not a second row
    with pytest.raises(RequestError, match="already labelled"):
        s.choose("tab2", one["id"], "B")
    third = s.next("tab1")
    assert third["item"]["id"] not in (one["id"], two["id"])
    s.choose("tab1", third["item"]["id"], "skip")
    last = s.next("tab1")
    assert last["item"] is None and last["waiting"] == 1        # the last one is open in tab2
    s.choose("tab2", two["id"], "B", note="clearer", annotator="ann")
    assert s.next("tab1")["item"] is None and s.next("tab1")["waiting"] == 0
    assert s.progress() == {"done": 3, "total": 3, "free_form": 0}
    s.store.close()
    rows = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert sorted(r["meta"]["item"] for r in rows) == sorted([one["id"], two["id"]])
    by_id = {r["meta"]["item"]: r for r in rows}
    assert by_id[one["id"]]["chosen"] == shown(one)["A"] and by_id[two["id"]]["chosen"] == shown(two)["B"]
    assert by_id[two["id"]]["meta"]["note"] == "clearer" and by_id[two["id"]]["meta"]["annotator"] == "ann"
    for r in rows:   # the recorded sides say where the chosen answer came from
        good = r["chosen"].startswith("good")
        assert r["meta"]["sides"][r["meta"]["choice"]] == ("chosen" if good else "rejected")
    (skip,) = [json.loads(x) for x in other_path(tmp_path / "labels.jsonl").read_text().splitlines()]
    assert skip["meta"]["choice"] == "skip" and set(skip["answers"]) == {"A", "B"}
    examples = load_examples([tmp_path / "labels.jsonl"])          # what fastdpo train reads
    assert [(e.turns, e.chosen, e.rejected) for e in examples] == [
        ([(t["from"], t["value"]) for t in r["conversations"]], r["chosen"], r["rejected"]) for r in rows]


def test_undo_takes_back_the_tabs_own_choice_and_shows_the_item_again(tmp_path):
    s = session_for(tmp_path, n=3)
    first = s.next("t")["item"]
    s.choose("t", first["id"], "B", note="n1")
    with pytest.raises(RequestError, match="another tab"):
        s.undo("other", first["id"])
    back = s.undo("t", first["id"])
    assert back["item"] == first and back["previous"] == {"choice": "B", "note": "n1"}
    assert s.progress()["done"] == 0 and (tmp_path / "labels.jsonl").read_text() == ""
    assert s.next("t")["item"]["id"] == first["id"]
    s.choose("t", first["id"], "A")
    with pytest.raises(RequestError, match="nothing to undo"):
        s.undo("t", "nope")
    s.store.close()


def test_an_expired_lease_returns_the_item_to_the_queue(tmp_path):
    s = session_for(tmp_path, n=1, lease_s=0.05)
    item = s.next("closed-tab")["item"]
    assert s.next("t2")["item"] is None
    time.sleep(0.1)
    assert s.next("t2")["item"]["id"] == item["id"]
    s.store.close()


def test_identical_or_empty_answers_cannot_become_pairs(tmp_path):
    rows = [{"prompt": "p", "responses": ["same ", "same", "x"]}]
    items = candidate_items(write_jsonl(tmp_path / "c.jsonl", rows))
    items[0].answers = ("same", "same ")
    s = LabelSession(items, LabelStore(tmp_path / "l.jsonl"))
    view = s.next("t")["item"]
    assert view["identical"]
    with pytest.raises(RequestError, match="identical"):
        s.choose("t", view["id"], "A")
    s.choose("t", view["id"], "tie")
    s.store.close()


# -- answers from checkpoints ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("label_models")
    return (make_tiny_checkpoint(d / "a", block_size=64, seed=0),
            make_tiny_checkpoint(d / "b", block_size=64, seed=1))


def test_two_checkpoints_answer_reproducibly_and_take_free_form_prompts(tmp_path, ckpts, one_thread):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Sort: fox cat {i}"} for i in range(3)])
    answerer = Answerer(*ckpts, max_new_tokens=6, temperature=0.9)
    items = prompt_items(prompts, answerer.models, seed=0, settings=answerer.settings)
    s = LabelSession(items, LabelStore(tmp_path / "l.jsonl"), answerer)
    view = s.next("t")["item"]
    s.choose("t", view["id"], "A")
    free = s.add_prompt("t", "What is a fox?")["item"]
    assert free["turns"] == [["user", "What is a fox?"]]
    s.choose("t", free["id"], "B")
    assert s.progress() == {"done": 1, "total": 3, "free_form": 1}
    s.store.close()
    rows = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert rows[0]["meta"]["models"] == {"model-a": str(ckpts[0]), "model-b": str(ckpts[1])}
    assert set(rows[0]["meta"]["sides"].values()) == {"model-a", "model-b"}
    assert rows[1]["meta"]["source"] == "free-form"
    # a restart regenerates the same answers for the same items, and resumes after the labelled one
    answerer2 = Answerer(*ckpts, max_new_tokens=6, temperature=0.9)
    items2 = prompt_items(prompts, answerer2.models, seed=0, settings=answerer2.settings)
    s2 = LabelSession(items2, LabelStore(tmp_path / "l.jsonl"), answerer2)
    assert s2.progress()["done"] == 1
    again = s2.next("t")["item"]
    assert again["id"] == items[1].id and shown(again) == shown(s.view(items[1]))
    s2.undo("t", free["id"])            # a free-form choice from before the restart can be undone
    assert s2.progress()["free_form"] == 0
    s2.store.close()


# -- HTTP ----------------------------------------------------------------------------------------------
def _call(url, path, body=None, key=None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_page_and_api_need_the_key_and_bad_bodies_are_400(tmp_path):
    srv = LabelServer(session_for(tmp_path), port=0, api_key="k3y").start_in_thread()
    try:
        assert _call(srv.url, "/api/next", {"tab": "t"})[0] == 401
        assert _call(srv.url, "/")[0] == 401
        code, page = _call(srv.url, "/?key=k3y")
        assert code == 200 and b"Prefer A" in page
        assert _call(srv.url, "/health")[0] == 200
        code, body = _call(srv.url, "/api/next", {"tab": "t"}, key="k3y")
        assert code == 200 and json.loads(body)["item"]["id"]
        code, body = _call(srv.url, "/api/choice", {"tab": "t", "id": "x"}, key="k3y")
        assert code == 400 and "choice" in json.loads(body)["error"]["message"]
        code, body = _call(srv.url, "/api/choice", {"tab": "t", "id": "x", "choice": "A"}, key="k3y")
        assert code == 404
    finally:
        srv.stop()


def test_cli_needs_one_source_and_names_the_extra_when_missing(tmp_path, capsys, monkeypatch):
    from fastdpo.cli import main
    assert main(["label", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "exactly one source" in capsys.readouterr().err
    monkeypatch.delenv("FASTDPO_API_KEY", raising=False)
    cands = pairs_file(tmp_path / "c.jsonl", 2)
    out = str(tmp_path / "o.jsonl")
    assert main(["label", "--out", out, "--candidates", str(cands), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allow-unauthenticated" in err and not (tmp_path / "o.jsonl").exists()
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["label", "--out", str(tmp_path / "o.jsonl"), "--candidates", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'fastdpo[ui]'" in err and "fastapi" in err


# -- a session of 100 choices, SIGKILLed and restarted -------------------------------------------------
def _start(cands, out):
    proc = subprocess.Popen([sys.executable, "-m", "fastdpo.cli", "label", "--candidates", str(cands),
                             "--out", str(out), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    line = proc.stdout.readline()
    assert "open http" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line.split("open ", 1)[1].split()[0]


def test_100_choices_survive_sigkill_at_random_moments(tmp_path):
    """The client retries a request whose answer it never got; after each SIGKILL the server is
    started again with the same command. Every item ends up labelled once, with the choice made."""
    cands, out = pairs_file(tmp_path / "cands.jsonl", 100), tmp_path / "labels.jsonl"
    rng = random.Random(os.getpid())
    intended: dict[str, str] = {}
    state = {"url": None}
    proc, state["url"] = _start(cands, out)
    kills = 0
    done = threading.Event()   # the labelling loop ended (or failed): the killer must not wait on

    def killer():
        nonlocal proc, kills
        for target in (rng.randint(10, 45), rng.randint(55, 90)):
            while len(intended) < target:
                if done.is_set():
                    return
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.03))          # anywhere inside a request, or between two
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            proc, state["url"] = _start(cands, out)

    def call(path, body):
        deadline = time.monotonic() + 60
        while True:
            try:
                req = urllib.request.Request(state["url"].rstrip("/") + path, data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    return json.loads(r.read())
            # A kill can land while the answer is on the wire: the connection drops before the
            # headers (RemoteDisconnected) or inside the body (IncompleteRead). Either way the client
            # never got the answer and asks again, as the page does.
            except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
                if isinstance(e, urllib.error.HTTPError):
                    raise
                assert time.monotonic() < deadline, "the server did not come back"
                time.sleep(0.05)

    k = threading.Thread(target=killer)
    k.start()
    try:
        while True:
            nxt = call("/api/next", {"tab": "tab-1"})
            if nxt["item"] is None:
                break
            iid = nxt["item"]["id"]
            choice = intended.setdefault(iid, rng.choice(["A", "B", "A", "B", "tie", "skip"]))
            call("/api/choice", {"tab": "tab-1", "id": iid, "choice": choice, "annotator": "kill-test"})
    finally:
        done.set()
        k.join()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    rows = [json.loads(x) for p in (out, other_path(out)) for x in p.read_text().splitlines()]
    assert kills == 2 and len(rows) == 100 == len(intended)
    assert {r["meta"]["item"]: r["meta"]["choice"] for r in rows} == intended
    pairs = [r for r in rows if r["meta"]["choice"] in ("A", "B")]
    assert len(load_examples([out])) == len(pairs)
    for r in pairs:
        assert r["chosen"].startswith("good") == (r["meta"]["sides"][r["meta"]["choice"]] == "chosen")


def test_fastdpo_train_runs_on_the_labels_as_written(tmp_path, ckpts, one_thread):
    """The label file goes straight into DPO training (metadata and all)."""
    from fastdpo.training.config import DPOConfig, PreferenceDatasetConfig, TrainingConfig
    from fastdpo.training.dpo import run_dpo
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Sort: fox cat {i}"} for i in range(6)])
    answerer = Answerer(*ckpts, max_new_tokens=6, temperature=1.0)
    s = LabelSession(prompt_items(prompts, answerer.models, settings=answerer.settings),
                     LabelStore(tmp_path / "labels.jsonl"), answerer)
    while (view := s.next("t")["item"]) is not None:
        pairable = not view["identical"] and view["a"].strip() and view["b"].strip()
        s.choose("t", view["id"], ("A" if len(view["a"]) >= len(view["b"]) else "B") if pairable else "tie")
    s.store.close()
    assert len(load_examples([tmp_path / "labels.jsonl"])) >= 2
    tc = TrainingConfig(run_name="dpo", output_dir=tmp_path / "runs", batch_size=2, micro_batch_size=2,
                        max_steps=2, mixed_precision="fp32", wandb="disabled", progress=False, device="cpu")
    data = PreferenceDatasetConfig(path=tmp_path / "labels.jsonl")
    final = run_dpo(ckpts[0], tc, DPOConfig(beta=0.1), data)
    assert (final / "config.json").is_file()
