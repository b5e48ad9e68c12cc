"""The `kubellm` command: serve, operator, make-tiny-model, fetch-demo-model, dev cluster."""

from __future__ import annotations

import argparse
import sys

from kubellm.settings import add_serve_arguments


def _make_tiny_model(args: argparse.Namespace) -> int:
    from kubellm.weights.tiny import make_tiny_model

    make_tiny_model(
        args.dir,
        args.arch,
        hidden=args.hidden_size,
        layers=args.num_layers,
        heads=args.num_heads,
        kv_heads=args.num_kv_heads,
        dtype=args.dtype,
        seed=args.seed,
    )
    print(args.dir)
    return 0


def serve_config(args: argparse.Namespace):
    """The ServerConfig of `kubellm serve` flags (over KUBELLM_* variables, over the --config file)."""
    from kubellm.runtime.server.config import ServerConfig

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config") and v is not None}
    if "api_key" in given:
        given["api_keys"] = given.pop("api_key")
    if "swap_space" in given:  # vLLM's unit: GiB
        given["swap_space_bytes"] = int(given.pop("swap_space") * (1 << 30))
    return ServerConfig.load(given, args.config)


def _serve(args: argparse.Namespace, **serve_options) -> int:
    from pydantic import ValidationError

    from kubellm.runtime.server.serve import serve

    try:
        config = serve_config(args)
    except (ValidationError, ValueError, OSError) as e:
        print(f"kubellm serve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    return serve(config, **serve_options)


def _add_serve(sub) -> None:
    s = sub.add_parser(
        "serve", help="serve a model over the OpenAI API (settings also from KUBELLM_* env)", allow_abbrev=False
    )
    add_serve_arguments(s)
    s.set_defaults(func=_serve)


def _operator(args: argparse.Namespace) -> int:
    from kubellm.operator.main import run_operator

    return run_operator(args.namespace or [], args.liveness, args.peering, args.priority, args.metrics_port)


def _router(args: argparse.Namespace) -> int:
    from kubellm.router.main import run_router

    return run_router(args)


def _crd(args: argparse.Namespace) -> int:
    from kubellm.operator.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def _fetch_model(args: argparse.Namespace) -> int:
    from kubellm.weights.fetch import fetch_model

    fetch_model(args.uri, args.dest, interval=args.progress_interval, termination_message=args.termination_message)
    return 0


def _wait_for_model(args: argparse.Namespace) -> int:
    from kubellm.weights.fetch import wait_for_model

    return wait_for_model(args.dest, args.uri, timeout_s=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubellm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny-model", help="write a small random-weight model + tokenizer (offline)")
    tiny.add_argument("dir")
    tiny.add_argument("--arch", choices=["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"], default="llama")
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--num-layers", type=int, default=2)
    tiny.add_argument("--num-heads", type=int, default=4)
    tiny.add_argument("--num-kv-heads", type=int, default=2)
    tiny.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_make_tiny_model)
    _add_serve(sub)

    op = sub.add_parser("operator", help="run the InferenceService operator (kopf)")
    op.add_argument("--namespace", action="append", help="watch only this namespace (repeatable); default: all")
    op.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL")
    op.add_argument("--peering", help="KopfPeering name for HA (several replicas, one active); default standalone")
    op.add_argument("--priority", type=int, default=0, help="peering priority")
    op.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port (0: off)")
    op.set_defaults(func=_operator)

    router = sub.add_parser(
        "router", help="one OpenAI endpoint for many InferenceServices (prefix-affinity routing, scale from zero)"
    )
    from kubellm.router.main import add_router_arguments

    add_router_arguments(router)
    router.set_defaults(func=_router)

    crd = sub.add_parser("crd", help="print the InferenceService CRD (generated from the pydantic spec)")
    crd.set_defaults(func=_crd)

    fetch = sub.add_parser("fetch-model", help="download hf://org/name[@rev] or s3://bucket/prefix into DEST")
    fetch.add_argument("uri")
    fetch.add_argument("dest")
    fetch.add_argument("--progress-interval", type=float, default=1.0, help="seconds between progress lines")
    fetch.add_argument(
        "--termination-message",
        metavar="FILE",
        help="once complete, write the model's config (the keys the fit check reads) to FILE: the cache Job's "
        "/dev/termination-log, where the operator reads it",
    )
    fetch.set_defaults(func=_fetch_model)

    wait = sub.add_parser("wait-for-model", help="wait until the model cache holds a complete copy of URI in DEST")
    wait.add_argument("uri")
    wait.add_argument("dest")
    wait.add_argument("--timeout", type=float, default=None, help="give up (exit 1) after this many seconds")
    wait.set_defaults(func=_wait_for_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
