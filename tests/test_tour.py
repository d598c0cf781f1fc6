"""The README's CLI tour, run as written: its judge (the ``python`` block) and its commands (the
``bash`` block), from an empty working directory holding only the data a user brings, through the
installed ``fastdpo`` script. Only sizes are overridden (``--set`` and size flags), never a path: the
commands must chain on their own (sft.yaml -> runs/sft/final -> data/pairs.jsonl -> audit ->
dpo_small.yaml -> runs/dpo/final -> eval -> serve), and ``--judge myjudge:score`` must import from the working
directory."""
import json
import os
import random
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from fastdpo.models.tokenizer import Tokenizer

README = Path(__file__).resolve().parent.parent / "README.md"
WORDS = "cat sun fox dog owl elk hen pig cow bee ant yak emu ram bat".split()
# tiny sizes: a smoke run of every step, not a result
SIZES = {
    "sft": [x for kv in ("train.max_steps=60", "train.batch_size=16", "train.micro_batch_size=16",
                         "train.learning_rate=2e-3", "train.warmup_steps=5", "train.log_every=20",
                         "sft.tokenizer_vocab_size=300") for x in ("--set", kv)],
    "pairs": ["--max-new-tokens", "16", "--min-best", "2", "--min-gap", "1", "--no-progress"],
    "audit": [],
    "train": ["--set", "train.max_steps=3", "--set", "train.batch_size=4", "--set", "train.log_every=1"],
    "eval": ["--max-new-tokens", "16", "--no-progress"],
    "serve": ["--port", "0", "--threads", "1"],
}


def tour() -> tuple[str, list[list[str]], dict]:
    """(the judge module, the commands, the curl request's JSON body) of the README's CLI tour."""
    section = README.read_text().split("## CLI tour", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    judge = next(code for lang, code in blocks if lang == "python")
    bash = [code.replace("\\\n", " ") for lang, code in blocks if lang == "bash"]
    commands = [shlex.split(ln) for ln in bash[0].splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    body = json.loads(re.search(r"-d '(.*?)'", bash[1], re.S).group(1))
    return judge, commands, body


def task_item(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def test_readme_tour_lists_the_loop_in_order():
    _, commands, body = tour()
    assert [c[1] for c in commands] == ["sft", "pairs", "audit", "train", "eval", "serve"]
    assert all(c[0] == "fastdpo" for c in commands)
    assert body["messages"][0]["role"] == "user"


def test_readme_tour_runs_end_to_end(tmp_path):
    script = Path(sys.executable).parent / "fastdpo"
    if not script.is_file():
        pytest.skip(f"fastdpo is not installed as a script next to {sys.executable}")
    judge, commands, body = tour()
    rng = random.Random(0)
    data = tmp_path / "data"
    data.mkdir()
    rows = [task_item(rng) for _ in range(400)]
    (data / "sft.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    for name, n in (("prompts", 48), ("eval_prompts", 8)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": task_item(rng)[0]}) + "\n"
                                                    for _ in range(n)))
    (tmp_path / "myjudge.py").write_text(judge)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # the judge: from the cwd only
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    outputs = {}
    for cmd in commands[:-1]:
        sub = cmd[1]
        proc = subprocess.run([str(script), *cmd[1:], *SIZES[sub]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs[sub] = proc.stdout

    runs = tmp_path / "runs"
    assert "tokenizer: none given for a fresh model; trained a" in outputs["sft"]
    assert (runs / "sft" / "final" / "tokenizer.json").is_file() and (runs / "sft" / "curves.png").is_file()
    pairs = [json.loads(ln) for ln in (data / "pairs.jsonl").read_text().splitlines()]
    eos = Tokenizer.load(runs / "sft" / "final" / "tokenizer.json").eos_id
    assert len(pairs) >= 4 and all(p["chosen_ids"][-1] == p["rejected_ids"][-1] == eos for p in pairs)
    assert "samples never chosen:" in outputs["pairs"]
    audit = json.loads((runs / "audit.json").read_text())   # the config's data, tokenizer and limits
    assert audit["rows"] == len(pairs) and audit["bad_rows"] == 0 and audit["length_unit"] == "tokens"
    assert f"({len(pairs)} rows," in outputs["train"]
    assert f"{len(pairs)} on their sampled token ids, 0 re-encoded" in outputs["train"]
    assert "reference: auto -> " in outputs["train"] and "step=3 loss=" in outputs["train"]
    assert (runs / "dpo" / "final").is_dir() and (runs / "dpo" / "curves.png").is_file()
    assert "runs/dpo/final vs runs/sft/final on 8 prompts" in outputs["eval"]
    assert json.loads((runs / "eval.json").read_text())["n_prompts"] == 8

    cmd = commands[-1]
    proc = subprocess.Popen([str(script), *cmd[1:], *SIZES["serve"]], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line + proc.stderr.read()
        url = line.split("listening on ", 1)[1].split()[0]
        req = urllib.request.Request(f"{url}/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert reply["model"] == body["model"] and isinstance(reply["choices"][0]["message"]["content"], str)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
