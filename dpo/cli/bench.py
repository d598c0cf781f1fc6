"""``fastdpo bench``: per-phase throughput, fast paths vs naive oracles."""
from __future__ import annotations

from fastdpo.bench.run import DEFAULT_PHASES, PHASES, run_bench


def add_subcommand(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="per-phase throughput: fast paths vs naive oracles (table, JSON, PNG)",
        description="Every phase, fast path vs the naive oracle, interleaved in one process: "
                    "a table, bench.json and bench.png.",
    )
    p.add_argument("--preset", default="tiny", choices=["tiny", "gpt2-124m"])
    p.add_argument(
        "--phases",
        default=",".join(DEFAULT_PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (or 'all')",
    )
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke run in about a minute")
    p.add_argument("--out", default="runs/bench", help="directory for bench.json and bench.png")
    p.add_argument("--no-peers", action="store_true", help="skip transformers/TRL/Liger rows")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--mining-ckpt", default=None,
                   help="SFT checkpoint mined from in the judge phase (default: runs/demo/sft/final if any)")
    p.add_argument("--sampler-url", default=None,
                   help="mining phase: the openai backend's server, e.g. a vLLM server of the exported "
                        "--mining-ckpt (default: fastdpo serve on it, started here)")
    p.add_argument("--sampler-model", default=None, help="mining phase: the served model's name")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    phases = PHASES if args.phases == "all" else tuple(p.strip() for p in args.phases.split(",") if p.strip())
    run_bench(args.preset, phases, quick=args.quick, out_dir=args.out, peers=not args.no_peers,
              threads=args.threads, mining_ckpt=args.mining_ckpt, sampler_url=args.sampler_url,
              sampler_model=args.sampler_model)
    return 0
