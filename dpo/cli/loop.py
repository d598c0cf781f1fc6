"""``fastdpo loop``: iterative DPO rounds (mine -> train -> eval -> quality gate -> promote)."""
from __future__ import annotations

from pathlib import Path

from fastdpo.cli.common import (
    DTYPES,
    add_device_arg,
    add_judge_args,
    add_sampler_args,
    generation_config_from_args,
    judge_from_args,
    parse_floats,
)
from fastdpo.cli.rubrics import add_rubric_args
from fastdpo.generation.mining import DEFAULT_TEMPS
from fastdpo.generation.online_loop import ON_FAIL, REFERENCES, BuiltinEngine, LoopConfig, run_loop


def add_subcommand(sub) -> None:
    p = sub.add_parser(
        "loop", help="iterative DPO: rounds of mining from the current policy, DPO, evaluation and a "
                     "quality gate (rerun the same command to resume)",
        description="Each round mines pairs from the current policy (or takes --datasets' file for that "
                    "round), trains DPO from it, evaluates the candidate against the previous policy and "
                    "the SFT model (position-swapped judge), and promotes it when the win rate among "
                    "decided prompts and the held-out score pass the gate; a failed round is retried "
                    "with beta x --beta-factor and steps x --steps-factor, up to --max-retries.")
    p.add_argument("--sft-checkpoint", type=Path, required=True,
                   help="the starting policy (fastdpo checkpoint or Hugging Face model directory)")
    p.add_argument("--out", type=Path, required=True,
                   help="loop directory: round-k/{pairs.jsonl,final,eval.json}, report.{json,md,png}")
    p.add_argument("--prompts", type=Path, default=None, help="prompt pool (JSONL with 'prompt')")
    p.add_argument("--datasets", type=Path, nargs="+", default=[],
                   help="a pairs file per round instead of mining (rounds after the last mine the pool)")
    p.add_argument("--eval-prompts", type=Path, required=True, help="held-out prompts for the quality gate")
    p.add_argument("--n-eval-prompts", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts-per-round", type=int, default=None,
                   help="round k mines the pool's k-th slice of this size (default: the whole pool)")
    p.add_argument("--max-pairs-per-round", type=int, default=None, help="train on at most this many pairs")
    p.add_argument("--reference", choices=REFERENCES, default="previous",
                   help="DPO reference: the round's start policy (previous) or the SFT model")
    g = p.add_argument_group("quality gate")
    g.add_argument("--min-win-rate", type=float, default=0.5,
                   help="promote when win / (win + loss) vs the previous policy is at least this")
    g.add_argument("--max-score-drop", type=float, default=0.0,
                   help="...and the mean held-out score fell by at most this")
    g.add_argument("--max-retries", type=int, default=1)
    g.add_argument("--beta-factor", type=float, default=2.0, help="a retry multiplies beta by this")
    g.add_argument("--steps-factor", type=float, default=0.5, help="a retry multiplies steps by this")
    g.add_argument("--on-fail", choices=ON_FAIL, default="stop",
                   help="after the last retry: stop, or continue from the unchanged policy")
    m = p.add_argument_group("mining and evaluation")
    m.add_argument("--temps", default=",".join(map(str, DEFAULT_TEMPS)), help="one sample per temperature")
    m.add_argument("--max-new-tokens", type=int, default=128)
    m.add_argument("--top-k", type=int, default=50)
    m.add_argument("--min-gap", type=int, default=2)
    m.add_argument("--min-best", type=int, default=6)
    m.add_argument("--batch-size", type=int, default=16, help="mining prompts per sampling batch")
    m.add_argument("--eval-temperature", type=float, default=0.7)
    m.add_argument("--eval-batch-size", type=int, default=32)
    m.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", type=Path, default=None,
                   help="training YAML (sections train/dpo, as for 'fastdpo train'): each round's settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config value, e.g. beta=0.2 or train.max_steps=50")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or directory (default: its own)")
    add_device_arg(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="sampling precision (autocast)")
    p.add_argument("--no-progress", action="store_true")
    add_judge_args(p)
    add_rubric_args(p)
    add_sampler_args(p, reload=True)
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from fastdpo.runtime import resolve_device
    from fastdpo.training.config import load_config
    resolve_device(args.device)   # a bad --device is named as such, not as the train.device it sets
    cfg = load_config(args.config, [*args.overrides, f"train.device={args.device}"], kind="dpo")
    loop = LoopConfig(rounds=args.rounds, prompts=args.prompts, prompts_per_round=args.prompts_per_round,
                      datasets=args.datasets, eval_prompts=args.eval_prompts,
                      n_eval_prompts=args.n_eval_prompts,
                      reference=args.reference, max_pairs_per_round=args.max_pairs_per_round,
                      min_win_rate=args.min_win_rate, max_score_drop=args.max_score_drop,
                      max_retries=args.max_retries, beta_factor=args.beta_factor,
                      steps_factor=args.steps_factor, on_fail=args.on_fail,
                      temps=parse_floats("--temps", args.temps), max_new_tokens=args.max_new_tokens,
                      top_k=args.top_k or None, min_gap=args.min_gap, min_best=args.min_best,
                      mine_batch_size=args.batch_size, eval_temperature=args.eval_temperature,
                      eval_batch_size=args.eval_batch_size, seed=args.seed)
    generation = generation_config_from_args(args, base=cfg.get("generation"),
                                             where=f"{args.config or '--set'}: generation")
    judge = judge_from_args(args)
    engine = _engine(generation, args)
    cfg["train"].progress = not args.no_progress
    try:
        report = run_loop(args.sft_checkpoint, args.out, judge, loop, cfg["train"], cfg["dpo"],
                          tokenizer=args.tokenizer, engine=engine, progress=not args.no_progress)
    finally:
        judge.close()
        if hasattr(engine, "close"):
            engine.close()
    from fastdpo.generation.loop_report import format_table
    print(format_table(report["table"]))
    print(f"policy: {report['policy']}; report: {args.out / 'report.md'}, {args.out / 'report.png'}")
    return 0


def _engine(generation, args):
    """The built-in sampler, or mining through the backend ``generation`` names (reloaded with
    each promoted policy; evaluation stays in this process)."""
    if generation.backend == "builtin":
        return BuiltinEngine(args.device, DTYPES[args.dtype], args.tokenizer)
    from fastdpo.generation.backend_engine import BackendEngine
    from fastdpo.generation.backends import make_backend
    from fastdpo.models.checkpoint import load_tokenizer
    from fastdpo.models.tokenizer import open_tokenizer
    tok = open_tokenizer(args.tokenizer) if args.tokenizer else load_tokenizer(args.sft_checkpoint)
    backend = make_backend(generation, args.sft_checkpoint, tok, device=args.device, dtype=DTYPES[args.dtype])
    return BackendEngine(backend, tok, args.sft_checkpoint, device=args.device, dtype=DTYPES[args.dtype],
                         tokenizer_path=args.tokenizer)
