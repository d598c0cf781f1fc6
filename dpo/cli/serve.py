"""``fastdpo serve``: a checkpoint behind an OpenAI-compatible HTTP API."""
from __future__ import annotations

from fastdpo.cli.common import DTYPES, add_device_arg
from fastdpo.generation.serve import serve
from fastdpo.runtime import resolve_device


def add_subcommand(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    p.add_argument("--ckpt", required=True, help="checkpoint or Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to expose it)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    p.add_argument("--model-name", default=None, help="name clients pass as 'model' (default: ckpt dir name)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or directory (default: the checkpoint's)")
    add_device_arg(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens per request")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--max-batch-rows", type=int, default=64, help="rows sampled together at most")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for company")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.set_defaults(func=lambda a: serve(
        a.ckpt, host=a.host, port=a.port, model_name=a.model_name, tokenizer_path=a.tokenizer,
        device=resolve_device(a.device), default_max_tokens=a.max_tokens, top_k=a.top_k,
        max_batch_rows=a.max_batch_rows,
        batch_window_ms=a.batch_window_ms, dtype=DTYPES[a.dtype], threads=a.threads))

