"""``fastdpo serve``: a checkpoint behind an OpenAI-compatible HTTP API (streaming included)."""
from __future__ import annotations

from fastdpo.cli.common import DTYPES, add_access_args, add_device_arg, api_key_from_args, require_extra


def add_subcommand(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    p.add_argument("--ckpt", required=True, help="checkpoint or Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (beyond loopback needs --api-key or --allow-unauthenticated)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    p.add_argument("--model-name", default=None, help="name clients pass as 'model' (default: ckpt dir name)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or directory (default: the checkpoint's)")
    add_device_arg(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens per request")
    p.add_argument("--top-k", type=int, default=50, help="default top_k (a request's top_k overrides it)")
    p.add_argument("--max-batch-rows", type=int, default=64, help="rows sampled together at most")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for company")
    p.add_argument("--max-n", type=int, default=16, help="largest n a request may ask for")
    p.add_argument("--max-rows-per-request", type=int, default=None,
                   help="largest prompts x n in one request (default: --max-batch-rows)")
    p.add_argument("--max-queued-rows", type=int, default=1024,
                   help="answers waiting at most; past that requests get 503 at once")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body (413 beyond)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds before a waiting request gets 503")
    p.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="write log-prob tokens as 'token_id:<id>' by default (vLLM's flag)")
    p.add_argument("--allow-reload", action="store_true",
                   help="accept POST /v1/load_lora_adapter (vLLM's route; lora_path: a fastdpo checkpoint "
                        "or adapter), which replaces the served weights: how the online loop's openai "
                        "sampler reaches a new policy")
    p.add_argument("--log-interactions", default=None, metavar="FILE",
                   help="append every request and answer to this JSONL (created owner-only); "
                        "'fastdpo label' and 'fastdpo pairs' take it as a prompt source")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    add_access_args(p)
    p.set_defaults(func=_cli)


def _cli(a) -> int:
    require_extra("serve", "serve", "fastapi", "uvicorn")
    from fastdpo.generation.serve import serve
    return serve(a.ckpt, host=a.host, port=a.port, model_name=a.model_name, tokenizer_path=a.tokenizer,
                 device=a.device, default_max_tokens=a.max_tokens, top_k=a.top_k,
                 max_batch_rows=a.max_batch_rows, batch_window_ms=a.batch_window_ms, dtype=DTYPES[a.dtype],
                 threads=a.threads, max_n=a.max_n, max_rows_per_request=a.max_rows_per_request,
                 max_queued_rows=a.max_queued_rows, max_body=int(a.max_body_mb * (1 << 20)),
                 request_timeout=a.request_timeout, api_key=api_key_from_args(a),
                 allow_unauthenticated=a.allow_unauthenticated, log_interactions=a.log_interactions,
                 tokens_as_ids=a.return_tokens_as_token_ids, allow_reload=a.allow_reload)
