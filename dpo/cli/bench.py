"""``fastdpo bench``: per-phase throughput, fastdpo vs the naive oracles and its peers, on equal work."""
from __future__ import annotations

from fastdpo.bench.run import DEFAULT_PHASES, PHASES, run_bench


def add_subcommand(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="per-phase throughput: fastdpo vs naive oracles and peers (table, JSON, PNG)",
        description="Every phase, fastdpo vs the naive oracle and its peers on the same work, in one "
                    "process: a table, bench.json, bench.png and table.md.",
    )
    p.add_argument("--preset", default="tiny", choices=["tiny", "gpt2-mid", "gpt2-124m"],
                   help="model shape: tiny (1.3M), gpt2-mid (6 layers, 512 wide, V=32768), gpt2-124m")
    p.add_argument(
        "--phases",
        default=",".join(DEFAULT_PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (or 'all'; default: all)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where every phase runs (auto: CUDA when available)")
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke run in a few minutes")
    p.add_argument("--full", action="store_true",
                   help="add the long runs: the oracle sampler on the headline workload (hours at 124M on a "
                        "CPU), every kernel case, the train phase's length scaling")
    p.add_argument("--out", default="runs/bench", help="directory for bench.json, bench.png and table.md")
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
              threads=args.threads, mining_ckpt=args.mining_ckpt, device=args.device, full=args.full,
              sampler_url=args.sampler_url, sampler_model=args.sampler_model, argv=_command(args))
    return 0


def _command(args) -> list[str]:
    """The command with every setting spelled out (defaults included), for bench.json."""
    cmd = ["fastdpo", "bench", "--preset", args.preset, "--phases", args.phases, "--device", args.device,
           "--out", str(args.out)]
    for flag, on in (("--quick", args.quick), ("--full", args.full), ("--no-peers", args.no_peers)):
        if on:
            cmd.append(flag)
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.mining_ckpt:
        cmd += ["--mining-ckpt", str(args.mining_ckpt)]
    if args.sampler_url:
        cmd += ["--sampler-url", args.sampler_url]
    if args.sampler_model:
        cmd += ["--sampler-model", args.sampler_model]
    return cmd
