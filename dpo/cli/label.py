"""``fastdpo label``: a local web page for preference labeling; each choice becomes a DPO pair."""
from __future__ import annotations

from fastdpo.cli.common import (
    DTYPES,
    add_access_args,
    add_device_arg,
    add_sampler_args,
    add_sampler_b_args,
    api_key_from_args,
    generation_config_from_args,
    require_extra,
)


def add_subcommand(sub) -> None:
    p = sub.add_parser("label", help="label preferences in a web page (two checkpoints, or a candidates "
                                     "file)")
    p.add_argument("--out", required=True,
                   help="labels JSONL (conversations format, trainable as is; appended at once; rerun to "
                        "resume); ties and skips go to OUT_STEM.ties_skips.jsonl")
    src = p.add_argument_group("source (one of)")
    src.add_argument("--candidates", default=None,
                     help="a preference file (e.g. mined pairs) or rows with K 'responses' per prompt, "
                          "to review")
    src.add_argument("--prompts", default=None,
                     help="a prompts JSONL or a 'fastdpo serve --log-interactions' file, answered by "
                          "the models")
    m = p.add_argument_group("models (answers generated on the fly; also enable free-form prompts)")
    m.add_argument("--model-a", default=None, help="checkpoint for one side")
    m.add_argument("--model-b", default=None,
                   help="checkpoint for the other side (default: --model-a with another seed)")
    m.add_argument("--tokenizer", default=None, help="tokenizer.json (default: each checkpoint's own)")
    m.add_argument("--max-new-tokens", type=int, default=128)
    m.add_argument("--temperature", type=float, default=0.7)
    m.add_argument("--top-k", type=int, default=50)
    add_device_arg(m)
    m.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--n", type=int, default=None,
                   help="label N items (prompts files: the first N; interaction logs: N sampled)")
    p.add_argument("--seed", type=int, default=0, help="sides, samples and generation seeds")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (beyond loopback needs --api-key or --allow-unauthenticated)")
    p.add_argument("--port", type=int, default=7860, help="0 picks a free port (printed on start)")
    add_access_args(p)
    add_sampler_args(p)
    add_sampler_b_args(p)
    p.set_defaults(func=_cli)


def _cli(a) -> int:
    require_extra("label", "ui", "fastapi", "uvicorn")
    from fastdpo.generation.label.app import label
    return label(a.out, candidates=a.candidates, prompts=a.prompts, model_a=a.model_a, model_b=a.model_b,
                 n=a.n, seed=a.seed, tokenizer=a.tokenizer, max_new_tokens=a.max_new_tokens,
                 temperature=a.temperature, top_k=a.top_k, device=a.device, dtype=DTYPES[a.dtype],
                 host=a.host, port=a.port, api_key=api_key_from_args(a),
                 allow_unauthenticated=a.allow_unauthenticated, generation=generation_config_from_args(a),
                 generation_b=generation_config_from_args(a, "b") if a.model_b else None)
