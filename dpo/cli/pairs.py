"""``fastdpo pairs``: mine preference pairs from a checkpoint (one shard per rank under torchrun)."""
from __future__ import annotations

from fastdpo import runtime
from fastdpo.cli.common import (
    DTYPES,
    add_device_arg,
    add_judge_args,
    add_sampler_args,
    judge_from_args,
    parse_floats,
    policy_sampler,
)
from fastdpo.cli.rubrics import add_rubric_args
from fastdpo.generation.judge import format_judge_stats
from fastdpo.generation.mining import DEFAULT_TEMPS, combine_stats, format_stats, mine_pairs
from fastdpo.generation.mining_progress import merge_shards, shard_path
from fastdpo.runtime import resolve_device


def add_subcommand(sub) -> None:
    p = sub.add_parser("pairs",
                       help="mine preference pairs: sample K answers per prompt, judge, keep best/worst")
    p.add_argument("--ckpt", required=True,
                   help="policy checkpoint or Hugging Face model directory (usually the SFT model)")
    p.add_argument("--prompts", required=True,
                   help="JSONL with a 'prompt' field per line, or a 'fastdpo serve --log-interactions' file "
                        "(its distinct chat prompts; --n-prompts samples N)")
    p.add_argument("--out", required=True,
                   help="pairs JSONL, appended as batches finish (rerunning the same command resumes); "
                        "statistics and judge failures go to OUT.report.json")
    p.add_argument("--resume", action="store_true",
                   help="continue the mining run in --out (after a judge failure or a kill); an error if "
                        "there is none. Without it a run in --out with the same settings is continued too")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or tokenizer directory (default: the checkpoint's)")
    p.add_argument("--temps", default=",".join(map(str, DEFAULT_TEMPS)), help="one sample per temperature")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--min-gap", type=int, default=2, help="keep a pair only if best - worst >= this")
    p.add_argument("--min-best", type=int, default=6, help="keep a pair only if best >= this")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per sampling batch (x K rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="drop longer prompts (default: block_size - max_new_tokens)")
    p.add_argument("--n-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--truncated-as-rejected", action="store_true",
                   help="judge answers that ran out of --max-new-tokens and let them be the rejected "
                        "answer (never the chosen one); by default they are counted and left out")
    add_device_arg(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="sampling precision (autocast)")
    p.add_argument("--no-progress", action="store_true")
    add_judge_args(p)
    add_sampler_args(p)
    add_rubric_args(p)
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    sharded = runtime.init_from_env()   # under torchrun: one shard of the batches per rank
    rank, world = runtime.rank(), runtime.world_size()
    judge = judge_from_args(args)
    try:
        sampler, tok = policy_sampler(args, args.ckpt, args.tokenizer, resolve_device(args.device),
                                      DTYPES[args.dtype])
    except BaseException:
        judge.close()
        raise
    if runtime.is_main():
        shards = f", {world} shards" if sharded else ""
        print(f"fastdpo pairs: sampler {sampler.describe()}, judge {judge.describe()}{shards}", flush=True)
    try:
        stats = mine_pairs(sampler, tok, args.prompts, judge,
                           shard_path(args.out, rank, world) if sharded else args.out,
                           temps=parse_floats("--temps", args.temps),
                           max_new_tokens=args.max_new_tokens, top_k=args.top_k, min_gap=args.min_gap,
                           min_best=args.min_best, batch_size=args.batch_size, seed=args.seed,
                           max_prompt_tokens=args.max_prompt_tokens, n_prompts=args.n_prompts,
                           dtype=DTYPES[args.dtype], progress=not args.no_progress and runtime.is_main(),
                           shard=(rank, world) if sharded else None,
                           truncated_as_rejected=args.truncated_as_rejected, must_resume=args.resume)
    finally:
        judge.close()
        sampler.close()
    if sharded:
        every = runtime.all_gather_object(stats)   # also: every shard is complete
        if runtime.is_main():
            merge_shards(args.out, world)
        runtime.barrier()
        if not runtime.is_main():
            return 0
        stats = combine_stats(every)
    print(format_stats(stats, args.out))
    if sampler.stats:
        print(f"sampler: {sampler.stats}")
    for line in format_judge_stats(judge.stats.as_dict()):
        print(line)
    return 0

