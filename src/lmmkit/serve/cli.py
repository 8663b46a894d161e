"""`lmmkit serve CHECKPOINT --port P`: the argument parser and the entry point.

Also runnable as `python -m lmmkit.serve.cli CHECKPOINT ...` (the same arguments).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from lmmkit.serve import ServeLimits
from lmmkit.serve.guard import GuardConfigError, add_guard_arguments, guard_from_args

_D = ServeLimits()


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serve` on the `lmmkit` command's subparsers."""
    p = subparsers.add_parser("serve", help="serve a checkpoint over OpenAI's chat API, with a chat page at /")
    add_serve_arguments(p)
    p.set_defaults(func=serve_main)
    return p


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="an lmmkit checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")
    p.add_argument("--api-key-env", metavar="NAME",
                   help="require `Authorization: Bearer <key>` on /v1/*, the key read from this environment variable")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (public addresses only; never internal or loopback ones)")
    p.add_argument("--max-image-bytes", type=int, default=_D.max_image_bytes)
    p.add_argument("--max-image-pixels", type=int, default=_D.max_image_pixels)
    p.add_argument("--max-images-per-request", type=int, default=_D.max_images_per_request)
    p.add_argument("--max-tokens", type=int, default=_D.max_tokens, help="the largest max_tokens a request may ask")
    p.add_argument("--default-max-tokens", type=int, default=_D.default_max_tokens)
    p.add_argument("--max-request-bytes", type=int, default=_D.max_request_bytes)
    p.add_argument("--max-batch-size", type=int, default=_D.max_batch_size)
    p.add_argument("--batch-window-ms", type=float, default=_D.batch_window_ms,
                   help="how long the first request of a batch waits for others to join it")
    p.add_argument("--max-queue", type=int, default=_D.max_queue, help="waiting requests beyond this get 503")
    p.add_argument("--image-cache-size", type=int, default=_D.image_cache_size,
                   help="encoded images kept in memory (LRU by content hash)")
    p.add_argument("--threads", type=int, help="torch CPU threads for generation")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_guard_arguments(p)  # --guard SPEC --guard-on input,image-text,output: moderation (docs/safety.md)


def limits_from_args(args: argparse.Namespace) -> ServeLimits:
    return ServeLimits(max_request_bytes=args.max_request_bytes, max_image_bytes=args.max_image_bytes,
                       max_image_pixels=args.max_image_pixels, max_images_per_request=args.max_images_per_request,
                       max_tokens=args.max_tokens, default_max_tokens=args.default_max_tokens,
                       allow_remote_images=args.allow_remote_images, max_batch_size=args.max_batch_size,
                       batch_window_ms=args.batch_window_ms, max_queue=args.max_queue,
                       image_cache_size=args.image_cache_size)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve_main(args: argparse.Namespace) -> int:
    """Load the checkpoint and serve it until interrupted."""
    try:
        import uvicorn

        from lmmkit.serve.app import create_app
    except ImportError as err:
        print(f"error: lmmkit serve needs FastAPI and uvicorn ({err}); pip install 'lmmkit[serve]'", file=sys.stderr)
        return 2
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            print(f"error: --api-key-env {args.api_key_env}: that environment variable is unset or empty",
                  file=sys.stderr)
            return 2
    elif not _is_loopback(args.host):
        print(f"warning: listening on {args.host} with no API key: anyone who can reach this port can use the "
              "model (set one with --api-key-env NAME)", file=sys.stderr)
    try:
        guard = guard_from_args(args)
    except GuardConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from lmmkit.train.checkpoint import load_model

    try:
        model = load_model(args.checkpoint)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: cannot load {args.checkpoint}: {err}", file=sys.stderr)
        return 2
    name = args.model_name or Path(args.checkpoint).resolve().name
    app = create_app(model, name, api_key=api_key, limits=limits_from_args(args), guard=guard)
    print(f"serving {name} on http://{args.host}:{args.port}  (chat page at /, API at /v1)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, server_header=False,
                timeout_graceful_shutdown=5)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmmkit serve", description="serve a checkpoint over OpenAI's chat API")
    add_serve_arguments(parser)
    return serve_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
