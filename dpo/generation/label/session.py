"""A labeling session: which item each browser tab shows, and every choice made.

Tabs are told apart by an id each tab keeps for its life. An item handed to a tab is leased to it
(``lease_s``, renewed whenever the tab asks again), so two tabs never show the same pending item;
a choice is accepted only for an item not yet labelled and not leased to another tab, so no item is
labelled twice, and a repeated request for a choice already stored (a retry after a lost answer)
is acknowledged without writing again. Undo takes back one of the tab's own choices and shows
that item again. A lease that expires (a closed tab) returns its item to the queue.
"""
from __future__ import annotations

import threading
import time
import uuid

from fastdpo.generation.interactions import now_iso
from fastdpo.generation.label.answers import Answerer
from fastdpo.generation.label.sources import Item, flip_for, item_id
from fastdpo.generation.label.store import CHOICES, PAIRED, LabelStore
from fastdpo.generation.openai_api import RequestError

MAX_NOTE = 10_000
MAX_PROMPT = 20_000


class LabelSession:
    def __init__(self, items: list[Item], store: LabelStore, answerer: Answerer | None = None, *,
                 seed: int = 0, lease_s: float = 600.0):
        self.items = {it.id: it for it in items}
        self.order = list(self.items)
        self.store, self.answerer, self.seed, self.lease_s = store, answerer, seed, lease_s
        self.free: dict[str, Item] = {}                    # free-form prompts (and undone rows rebuilt)
        self.leases: dict[str, tuple[str, float]] = {}     # item id -> (tab, expiry)
        self.current: dict[str, str] = {}                  # tab -> the item it shows
        self._lock = threading.Lock()
        self._prefetching = threading.Lock()

    # -- queries ----------------------------------------------------------------------------------
    def progress(self) -> dict:
        done = sum(1 for i in self.order if i in self.store.done)
        free = sum(1 for r in self.store.done.values() if r["meta"]["source"] == "free-form")
        return {"done": done, "total": len(self.order), "free_form": free}

    def _item(self, iid: str) -> Item | None:
        return self.items.get(iid) or self.free.get(iid)

    def _holder(self, iid: str) -> str | None:
        lease = self.leases.get(iid)
        return lease[0] if lease and lease[1] > time.monotonic() else None

    def _lease(self, tab: str, iid: str) -> None:
        self.leases[iid] = (tab, time.monotonic() + self.lease_s)
        self.current[tab] = iid

    def view(self, item: Item) -> dict:
        a, b = item.shown()
        return {"id": item.id, "turns": [list(t) for t in item.turns], "a": item.answers[a],
                "b": item.answers[b], "truncated": {"a": item.truncated[a], "b": item.truncated[b]},
                "source": item.source,
                "identical": item.answers[a].strip() == item.answers[b].strip()}

    # -- actions ----------------------------------------------------------------------------------
    def next(self, tab: str) -> dict:
        """The item this tab should show: its current one if still pending, else the first pending
        item no other tab holds (None when none is left for it)."""
        elsewhere = 0
        with self._lock:
            iid = self.current.get(tab)
            if iid is None or iid in self.store.done or self._holder(iid) not in (None, tab):
                iid = None
                for cand in self.order:
                    if cand in self.store.done:
                        continue
                    if self._holder(cand) not in (None, tab):
                        elsewhere += 1
                        continue
                    iid = cand
                    break
            if iid is not None:
                self._lease(tab, iid)
            else:
                self.current.pop(tab, None)
            item = self._item(iid) if iid else None
        if item is not None:
            self._answer(item)
            self._prefetch()
        return {"item": self.view(item) if item else None, "waiting": elsewhere, "progress": self.progress()}

    def choose(self, tab: str, iid: str, choice: str, note: str = "", annotator: str = "") -> dict:
        if choice not in CHOICES:
            raise RequestError(400, f"choice must be one of {list(CHOICES)}", "choice")
        with self._lock:
            item = self._item(iid)
            if item is None:
                raise RequestError(404, f"no item {iid!r}", "id")
            row = self.store.done.get(iid)
            if row is not None:
                if row["meta"]["tab"] == tab and row["meta"]["choice"] == choice:
                    return {"saved": True, "duplicate": True, "progress": self.progress()}
                raise RequestError(409, "this item is already labelled (in another tab, or before)", "id")
            if self._holder(iid) not in (None, tab):
                raise RequestError(409, "this item is open in another tab", "id")
            if item.answers is None:
                raise RequestError(409, "this item's answers are not generated yet", "id")
            self.store.append(self._row(item, choice, note, annotator, tab))
            self.leases.pop(iid, None)
            if self.current.get(tab) == iid:
                del self.current[tab]
        return {"saved": True, "duplicate": False, "progress": self.progress()}

    def undo(self, tab: str, iid: str) -> dict:
        with self._lock:
            row = self.store.done.get(iid)
            if row is None:
                raise RequestError(404, "that choice is not in the file (nothing to undo)", "id")
            if row["meta"]["tab"] != tab:
                raise RequestError(409, "that choice was made in another tab", "id")
            self.store.remove(iid)
            item = self._item(iid)
            if item is None:   # a free-form item from before a restart: rebuilt from its row
                item = self.free[iid] = _item_from_row(row)
            self._lease(tab, iid)
        previous = {"choice": row["meta"]["choice"], "note": row["meta"]["note"]}
        return {"item": self.view(item), "previous": previous, "progress": self.progress()}

    def add_prompt(self, tab: str, text: str) -> dict:
        if self.answerer is None:
            raise RequestError(400, "free-form prompts need checkpoints to answer them (--model-a)", "prompt")
        if not text.strip() or len(text) > MAX_PROMPT:
            raise RequestError(400, f"the prompt must be non-empty and at most {MAX_PROMPT} characters",
                               "prompt")
        turns = [("user", text)]
        iid = item_id("free-form", turns, uuid.uuid4().hex)
        item = Item(iid, turns, self.answerer.names, "free-form", flip=flip_for(self.seed, iid))
        self._answer(item)
        with self._lock:
            self.free[iid] = item
            self._lease(tab, iid)
        return {"item": self.view(item), "progress": self.progress()}

    # -- helpers ----------------------------------------------------------------------------------
    def _answer(self, item: Item) -> None:
        if item.answers is None:
            if self.answerer is None:
                raise RequestError(500, f"item {item.id} has no answers and no model to generate them")
            self.answerer.answer(item)

    def _prefetch(self) -> None:
        """Generate the next pending item's answers in the background, so the page does not wait."""
        if self.answerer is None or not self._prefetching.acquire(blocking=False):
            return

        def run():
            try:
                with self._lock:
                    todo = next((self.items[i] for i in self.order if i not in self.store.done
                                 and self.items[i].answers is None and self._holder(i) is None), None)
                if todo is not None:
                    self.answerer.answer(todo)
            finally:
                self._prefetching.release()

        threading.Thread(target=run, name="fastdpo-label-prefetch", daemon=True).start()

    def _row(self, item: Item, choice: str, note: str, annotator: str, tab: str) -> dict:
        a, b = item.shown()
        shown = {"A": item.answers[a], "B": item.answers[b]}
        meta = {"item": item.id, "choice": choice, "sides": {"A": item.origins[a], "B": item.origins[b]},
                "source": item.source, "annotator": annotator[:200], "note": note[:MAX_NOTE],
                "time": now_iso(), "tab": tab, "truncated": {"A": item.truncated[a], "B": item.truncated[b]}}
        if self.answerer is not None and item.origins[0].startswith("model-"):
            meta["models"] = self.answerer.models
        if item.extra:
            meta["candidate"] = item.extra
        conv = [{"from": role, "value": text} for role, text in item.turns]
        if choice not in PAIRED:
            return {"conversations": conv, "answers": shown, "meta": meta}
        chosen, rejected = shown[choice], shown["B" if choice == "A" else "A"]
        if chosen.strip() == rejected.strip():
            raise RequestError(409, "the two answers are identical: choose Tie or Skip", "choice")
        if not chosen.strip() or not rejected.strip():
            raise RequestError(409, "an empty answer cannot be trained on: choose Tie or Skip", "choice")
        return {"conversations": conv, "chosen": chosen, "rejected": rejected, "meta": meta}


def _item_from_row(row: dict) -> Item:
    meta = row["meta"]
    if meta["choice"] in PAIRED:
        other = "B" if meta["choice"] == "A" else "A"
        shown = {meta["choice"]: row["chosen"], other: row["rejected"]}
    else:
        shown = row["answers"]
    return Item(meta["item"], [(t["from"], t["value"]) for t in row["conversations"]],
                (meta["sides"]["A"], meta["sides"]["B"]), meta["source"], (shown["A"], shown["B"]),
                (meta["truncated"]["A"], meta["truncated"]["B"]))
