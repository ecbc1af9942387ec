"""``python -m transformer.serve --checkpoint CKPT``: translate over HTTP, with a page.

Loads the checkpoint once, then serves the REST API and the page (docs/serving.md)
until SIGINT or SIGTERM, which let the requests in flight finish first. torch is
imported only once the arguments are read (``--help`` is instant), as in ``cli.py``.
"""

from __future__ import annotations

import argparse
import socket
import sys

from transformer.cli import _fail


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        # "python -m transformer.serve", or the console script's own name.
        prog="python -m transformer.serve" if sys.argv[0].endswith("__main__.py") else None,
        description="Serve a trained checkpoint over HTTP: a REST API (POST /translate in LibreTranslate's shape, "
        "POST /attention, GET /info, GET /health; OpenAPI page at /docs) and a page at / that translates as you "
        "type and shows the attention.",
    )
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by train.py, or a folder written by "
                        "python -m transformer.export (decoded by CTranslate2; no /attention)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                        "only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000; 0 picks a free one, printed)")
    decoding = parser.add_argument_group("decoding (the defaults of every request)")
    decoding.add_argument("--beam-size", type=_positive(int), help="beams per sentence; 1 = greedy "
                          "(default: the checkpoint's)")
    decoding.add_argument("--length-penalty", type=float, metavar="ALPHA", help="GNMT length penalty "
                          "(default: the checkpoint's)")
    decoding.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    decoding.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="decode with the weights cast to this "
                          "type (default: the checkpoint's decode.dtype, else fp32)")
    batching = parser.add_argument_group("batching")
    batching.add_argument("--threads", type=_positive(int), help="torch threads in all, set once at start-up "
                          "(default: torch's, one per core)")
    batching.add_argument("--workers", type=_positive(int), help="decoding threads, each on its share of the "
                          "threads and decoding its own batches (default: 2 on a CPU with two threads or more)")
    batching.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a request may wait for others "
                          "to share its batch (default 10)")
    batching.add_argument("--static-batches", action="store_true", help="decode greedy requests in batches that "
                          "end together, as beam search's, instead of letting sentences join and leave the rows being "
                          "decoded at every step (continuous batching, the default)")
    batching.add_argument("--batch-tokens", type=_positive(int), help="padded source tokens in a batch, at most "
                          "(default: the checkpoint's decode.batch_tokens)")
    limits = parser.add_argument_group("limits of one request")
    limits.add_argument("--max-chars", type=_positive(int), default=5000, help="characters of text (default 5000)")
    limits.add_argument("--max-sentences", type=_positive(int), default=64, help="sentences in q (default 64)")
    limits.add_argument("--max-body-bytes", type=_positive(int), default=256 * 1024,
                        help="bytes of the request body (default 262144)")
    limits.add_argument("--max-beam-size", type=_positive(int), default=16, help="beam_size (default 16)")
    limits.add_argument("--max-attention-tokens", type=_positive(int), default=128,
                        help="source tokens of the sentence of POST /attention (default 128)")
    server = parser.add_argument_group("server")
    server.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                        help="log every request (default: on)")
    server.add_argument("--shutdown-timeout", type=_positive(float), default=60.0,
                        help="seconds that SIGTERM waits for requests in flight before cancelling them (default 60)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_wait_ms < 0:
        parser.error("--batch-wait-ms must be 0 or more")
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    try:
        import uvicorn

        from transformer.serve.app import Batching, Limits, Service, create_app
    except ImportError as e:
        return _fail(f"the server needs fastapi and uvicorn ({e}): pip install -e \".[serve]\"")

    import torch

    from transformer.config import ConfigError
    from transformer.fast.memory import keep_freed_memory
    from transformer.runtime import resolve_device, setup_logging
    from transformer.training.checkpoint import CheckpointError

    setup_logging()
    keep_freed_memory(one_arena=True)  # decoding threads share the main arena, as in translate.py
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # once, before any decoding thread starts
    try:
        device = resolve_device(args.device, "--device")
    except ConfigError as e:
        return _fail(str(e))
    threads = torch.get_num_threads()
    # As translate.py: two decoding threads with one core each use a 2-core CPU better
    # than one batch on both (docs/performance.md).
    workers = args.workers or (2 if device.type == "cpu" and threads >= 2 else 1)
    overrides = {k: getattr(args, k) for k in ("beam_size", "length_penalty", "dtype", "batch_tokens")
                 if getattr(args, k) is not None}
    limits = Limits(args.max_chars, args.max_sentences, args.max_body_bytes, args.max_beam_size,
                    args.max_attention_tokens)
    batching = Batching(workers=workers, threads=max(1, threads // workers), wait_ms=args.batch_wait_ms,
                        continuous=not args.static_batches)
    try:
        sock = _listen(args.host, args.port)
    except OSError as e:
        return _fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    try:
        service = Service.load(args.checkpoint, device=str(device), limits=limits, batching=batching, **overrides)
    except (CheckpointError, ConfigError, ValueError, ImportError) as e:  # ValueError: a bad export too
        sock.close()
        return _fail(str(e))
    app = create_app(service)
    config = uvicorn.Config(app, log_level="info", access_log=args.access_log,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {args.checkpoint} ({service.source} -> {service.target}) at http://{shown}:{port}/ "
          f"(API documentation at /docs)", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        return 130
    finally:
        service.close()  # a no-op after a clean shutdown: the lifespan closed it
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    sys.exit(main())
