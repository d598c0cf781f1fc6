"""``fastdpo eval``: win rate of checkpoint A vs B with position-swapped judging."""
from __future__ import annotations

import os

from fastdpo.cli.common import (
    DTYPES,
    add_device_arg,
    add_judge_args,
    add_sampler_args,
    add_sampler_b_args,
    generation_config_from_args,
    judge_from_args,
    policy_sampler,
)
from fastdpo.cli.rubrics import add_rubric_args
from fastdpo.generation.evaluate import MODES, evaluate, format_report
from fastdpo.runtime import resolve_device


def add_subcommand(sub) -> None:
    p = sub.add_parser("eval", help="win rate of checkpoint A vs B (position-swapped judging)")
    p.add_argument("--a", required=True,
                   help="challenger checkpoint or Hugging Face model directory (e.g. the DPO model)")
    p.add_argument("--b", required=True,
                   help="baseline checkpoint or Hugging Face model directory (e.g. the SFT model)")
    p.add_argument("--name-a", default=None, help="A's name in the report (default: its path)")
    p.add_argument("--name-b", default=None, help="B's name in the report (default: its path)")
    p.add_argument("--prompts", required=True,
                   help="held-out prompts: JSONL with a 'prompt' field, an MT-Bench question file "
                        "(question_id, category, turns) or an AlpacaEval file (instruction, input)")
    p.add_argument("--n-prompts", type=int, default=None, help="use the first N prompts (or questions)")
    p.add_argument("--mode", choices=MODES, default="compare")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or tokenizer directory (default: A's checkpoint's)")
    add_device_arg(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--report", default=None,
                   help="write the JSON report here; answers and verdicts are kept as they come in "
                        "REPORT.progress.jsonl")
    p.add_argument("--resume", action="store_true",
                   help="continue the evaluation kept next to --report (after a judge failure or a kill): "
                        "no answer generated or verdict asked for twice, the same report in the end")
    p.add_argument("--no-progress", action="store_true")
    add_judge_args(p)
    add_sampler_args(p)
    add_sampler_b_args(p)
    add_rubric_args(p)
    p.set_defaults(func=_cli)


def checkpoint_names(a: str, b: str, name_a: str | None = None, name_b: str | None = None) -> tuple[str, str]:
    """What the report calls A and B: the given names, else the paths as typed (``runs/dpo/final``
    vs ``runs/sft/final``: two checkpoint directories are usually both called ``final``)."""
    name_a, name_b = name_a or os.path.normpath(a), name_b or os.path.normpath(b)
    return (f"{name_a} (A)", f"{name_b} (B)") if name_a == name_b else (name_a, name_b)


def _cli(args) -> int:
    generation_config_from_args(args, side="b")   # a bad B setting fails before anything loads
    judge = judge_from_args(args)
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    side_a, tok = policy_sampler(args, args.a, args.tokenizer, device, dtype)
    side_b, _ = policy_sampler(args, args.b, args.tokenizer or args.a, device, dtype, side="b")
    # the built-in sampler is passed as the model itself (evaluate's own batching and precision)
    model_a, model_b = (s.model if s.name == "builtin" else s for s in (side_a, side_b))
    try:
        report = evaluate(model_a, model_b, tok, args.prompts, judge, mode=args.mode,
                          temperature=args.temperature, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                          seed=args.seed, batch_size=args.batch_size, n_prompts=args.n_prompts,
                          dtype=DTYPES[args.dtype], report_path=args.report, progress=not args.no_progress,
                          names=checkpoint_names(args.a, args.b, args.name_a, args.name_b),
                          resume=args.resume)
    finally:
        judge.close()
        side_a.close()
        side_b.close()
    print(format_report(report))
    for side, s in (("A", side_a), ("B", side_b)):
        if s.stats:
            print(f"  sampler {side} ({s.describe()}): {s.stats}")
    if args.report:
        print(f"  report: {args.report}")
    return 0
