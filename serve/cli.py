"""`catversion serve`: run the OpenAI-compatible generation endpoint on Ray Serve.

Registered into `catversion` through the `catversion.commands` entry point group; building the
parser imports neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from catversion import layout, storage
from catversion.errors import CLIError
from catversion.limits import BUILTIN_MODELS, DEFAULT_MODEL, PRECISION_CHOICES, PRECISION_HELP

DESCRIPTION = f"""\
Serve every residual {layout.RESIDUAL_PATTERN} (PREFIX: the `catversion batch --output`) behind an
OpenAI-Images-compatible HTTP API: POST /v1/images/generations with "model": <concept id>,
<concept id>@<sha256 prefix> or "base" (stream, png/jpeg/webp, url responses, WIDTHxHEIGHT sizes),
GET /v1/models, GET /healthz, OpenAPI schema at /docs. Residuals load on first use, are cached and
are revalidated against storage every residual_ttl_s (5 s). Every request's samples join the running
UNet batch at the next denoising step, whatever their concept, step count or guidance.

Each generator replica warms up before it takes requests: with --compile (the default on a GPU) the
UNet is compiled once and a CUDA graph is recorded per batch size (1-2 minutes on a GPU); the time
is logged and shown by GET /healthz.

--config takes a Ray Serve config YAML (serve/config.yaml is the documented example); flags given
here override its `args`. The same file deploys to a cluster with `serve deploy`.
"""


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve residuals over an OpenAI-compatible HTTP API (Ray Serve)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--residuals", metavar="PREFIX",
                   help=f"s3://bucket/prefix or a folder holding {layout.RESIDUAL_PATTERN.removeprefix('PREFIX/')}")
    p.add_argument("--model", help=f"base model: {' | '.join(BUILTIN_MODELS)} | a diffusers folder | a hub id "
                                   f"(default: {DEFAULT_MODEL})")
    p.add_argument("--config", help="Ray Serve config YAML (e.g. serve/config.yaml)")
    p.add_argument("--host", help="HTTP host (default: 127.0.0.1, or the config's)")
    p.add_argument("--port", type=int, help="HTTP port (default: 8000, or the config's)")
    p.add_argument("--api-key-file", help="file with one API key per line; requests must send 'Authorization: Bearer KEY'")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--precision", choices=PRECISION_CHOICES, help=f"{PRECISION_HELP} (default: auto, or the config's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the UNet with a CUDA graph per batch size, warmed up before a replica serves "
                        "(default: on when the replica runs on CUDA, or the config's `compile`)")
    p.add_argument("--address", help="Ray cluster address (default: start or join a local Ray)")
    p.set_defaults(func=run)


def load_config(path: str | None) -> tuple[dict, dict, dict]:
    """(application args incl. deployment_options, http options, the whole file) from a Serve config YAML."""
    if not path:
        return {}, {}, {}
    import yaml

    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--config {path}: cannot read it as YAML ({exc})") from None
    apps = document.get("applications") or []
    if not apps:
        raise ValueError(f"--config {path}: no `applications:` entry")
    app = apps[0]
    if app.get("import_path", "serve.app:build_app") != "serve.app:build_app":
        raise ValueError(f"--config {path}: import_path must be serve.app:build_app, got {app['import_path']!r}")
    args = dict(app.get("args") or {})
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments") or []}
    if options:
        args["deployment_options"] = options
    return args, dict(document.get("http_options") or {}), document


def application_args(args: argparse.Namespace) -> tuple[dict, dict]:
    """(application args, http options): the --config file's, with the flags given on the command line
    put over them."""
    app_args, http, _ = load_config(args.config)
    for flag, key in (("residuals", "residuals"), ("model", "model"), ("api_key_file", "api_key_file"), ("device", "device"),
                      ("precision", "precision")):
        if getattr(args, flag):
            app_args[key] = getattr(args, flag)
    if args.compile is not None:
        app_args["compile"] = "on" if args.compile else "off"
    if not app_args.get("residuals"):
        raise CLIError("--residuals PREFIX is required (or `args.residuals` in --config)")
    return app_args, http


def run(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    from .app import build_app, read_keys

    app_args, http = application_args(args)
    if args.api_key_file and not Path(args.api_key_file).is_file():
        raise CLIError(f"--api-key-file {args.api_key_file} does not exist")
    if app_args.get("api_key_file"):  # a bad key file fails here, with its line number, not in a replica's log
        read_keys(app_args["api_key_file"])
    # Replicas run in their own folders: relative local paths must mean what they mean here.
    app_args["residuals"] = storage.absolute(app_args["residuals"])
    if app_args.get("api_key_file"):
        app_args["api_key_file"] = storage.absolute(app_args["api_key_file"])
    host = args.host or (http.get("host") if args.config else None) or "127.0.0.1"
    port = args.port or http.get("port") or 8000
    application = build_app(app_args)

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=args.address, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name="catversion", route_prefix="/")
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        print(f"serving {app_args['residuals']} at http://{shown}:{port}/v1 (OpenAPI docs at /docs); Ctrl-C to stop", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        print("shutting down", file=sys.stderr)
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
