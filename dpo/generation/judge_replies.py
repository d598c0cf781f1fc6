"""Reading a judge's replies: rubric prompt templates, the score and verdict a reply's text holds,
and the text a chat-completion reply body holds (``BadReply`` when the body is not one)."""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from fastdpo.generation.retry import BadReply, clip

_SCORE_RE = re.compile(r"(?<![\d.\-])(10|[1-9])(?:\.\d+)?(?!\d)")
_VERDICT_RE = re.compile(
    r"^[\s\W]*(?:(?:final\s+)?(?:answer|verdict|better(?:\s+answer)?|winner)\s*(?:is)?\s*[:\-]?\s*)?"
    r"[\s\[\(\*\"'`]*(A|B|TIE)[\s\]\)\*\"'`.!]*$", re.IGNORECASE)


def parse_score(text: str | None) -> int | None:
    """The first integer 1-10 in a reply ("7", "Score: 7", "7/10", "**8**"); else ``None``.

    Numbers outside the scale ("0", "11", "42") are not scores: the reply is invalid."""
    if not text:
        return None
    m = _SCORE_RE.search(text)
    return int(m.group(1)) if m else None


def parse_verdict(text: str | None) -> str | None:
    """``"A"``, ``"B"`` or ``"TIE"`` when the whole reply is one verdict ("A", "[[B]]",
    "Verdict: tie", "Answer A."); anything else (prose, "A or B", empty) is ``None``."""
    if not text:
        return None
    m = _VERDICT_RE.match(text.strip())
    return m.group(1).upper() if m else None


def load_prompt(path: str | Path, fields: Sequence[str]) -> str:
    """A rubric template; every ``{field}`` must appear in it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"judge prompt not found: {path}")
    text = path.read_text()
    missing = [f for f in fields if "{" + f + "}" not in text]
    if missing:
        names = ", ".join("{" + f + "}" for f in missing)
        raise ValueError(f"{path}: judge prompt lacks the placeholder(s) {names}")
    return text


def fill_prompt(template: str, **values: str) -> str:
    # str.format would choke on braces elsewhere in a template; plain replacement does not.
    for k, v in values.items():
        template = template.replace("{" + k + "}", v)
    return template



def completion_text(body: str, status: int | None = None) -> str | None:
    """The first choice's message text of a chat-completion reply body; ``None`` when the reply
    has no text (no choices, null content); ``BadReply`` when the body is not a chat completion
    at all (an HTML page, a proxy's error text, JSON of another shape)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise BadReply(f"not JSON: {clip(body, 120)!r}", body, status) from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list):
        raise BadReply(f"not a chat completion (no 'choices'): {clip(body, 120)!r}", body,
                       status)
    if not choices:
        return None
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise BadReply(f"its first choice has no 'message': {clip(body, 120)!r}", body, status)
    text = message.get("content")
    return text if isinstance(text, str) else None
