"""The online loop on the ``openai`` generation backend: two rounds mined through fastdpo serve,
the promoted policy loaded into the server between rounds (its /v1/load_lora_adapter route)."""
import json

import pytest
import torch

from fastdpo.bench.judge import make_tiny_checkpoint
from fastdpo.generation.backend_engine import BackendEngine
from fastdpo.generation.backends import GenerationConfig
from fastdpo.generation.judge import ProgrammaticJudge
from fastdpo.generation.online_loop import LoopConfig, run_loop
from fastdpo.generation.openai_sampler import OpenAISampler
from fastdpo.generation.serve import ChatServer
from fastdpo.models.checkpoint import load_policy
from fastdpo.training.config import DPOConfig, TrainingConfig

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = "fox dog elk gnu hen ink jam kit owl pig ant bee".split()


def toy_score(instruction, response):
    return 1 + (len(response) * 7 + len(instruction)) % 10


def test_two_rounds_mine_through_the_server_reloading_the_policy(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", block_size=96, stop_logit=3.0)
    model, tok = load_policy(ckpt)
    log = tmp_path / "interactions.jsonl"
    srv = ChatServer(model, tok, port=0, model_name="tiny", allow_reload=True, log_interactions=log,
                     batch_window_ms=2).start_in_thread()
    prompts, evals = tmp_path / "prompts.jsonl", tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Reverse the words: {w} cat {i}"}) + "\n"
                               for i, w in enumerate(WORDS)))
    evals.write_text("".join(json.dumps({"prompt": f"Sort the words: {w} sun"}) + "\n" for w in WORDS[:4]))
    config = GenerationConfig(backend="openai", url=srv.url, reload="lora")
    backend = OpenAISampler(config, tok, block_size=96, policy=ckpt)
    engine = BackendEngine(backend, tok, ckpt)
    out = tmp_path / "loop"
    tc = TrainingConfig(batch_size=2, max_steps=3, learning_rate=1e-3, wandb="disabled", report_to=["none"],
                        progress=False, device="cpu", mixed_precision="fp32", output_dir=out)
    loop = LoopConfig(rounds=2, prompts=prompts, prompts_per_round=6, eval_prompts=evals, max_new_tokens=12,
                      mine_batch_size=3, eval_batch_size=8, temps=[0.7, 1.3, 1.6], seed=3,
                      min_win_rate=0.0, max_score_drop=10.0)          # both rounds promoted
    marks = []
    try:
        report = run_loop(ckpt, out, ProgrammaticJudge(toy_score, name="toy"), loop, tc,
                          DPOConfig(beta=0.1, max_length=96, max_prompt_length=80), engine=engine,
                          progress=False, say=lambda *a, **k: None,
                          on_round=lambda k, r: marks.append(log.stat().st_size))
        assert [r["promoted"] for r in report["rounds"]] == [True, True]
        finals = [out / "round-1" / "final", out / "round-2" / "final"]
        assert engine.reloads == [str(f.resolve()) for f in finals] and backend.counts["reloads"] == 2
        # round 2's pairs are answers the server gave after it loaded round 1's policy
        served = {}
        with open(log, encoding="utf-8") as f:
            f.seek(marks[0])
            for line in f:
                rec = json.loads(line)
                for c in rec["choices"]:
                    prompt = tuple(rec["prompt"][c["index"] // rec["sampling"]["n"]])
                    served.setdefault(prompt, []).append(c["token_ids"] + [tok.eos_id])
        rows = [json.loads(x) for x in (out / "round-2" / "pairs.jsonl").read_text().splitlines()]
        assert rows and all(r["chosen_ids"] in served[tuple(r["prompt_ids"])] for r in rows)
        # and the server now samples from round 2's policy
        final = load_policy(finals[1])[0].state_dict()
        served_now = srv.batcher.model.state_dict()
        assert all(torch.equal(served_now[k], final[k]) for k in final)
        assert not all(torch.equal(model.state_dict()[k], final[k]) for k in final)
    finally:
        engine.close()
        srv.stop()
        srv.close()
