"""`catversion serve`: run the OpenAI-compatible generation endpoint on Ray Serve.

Registered into `catversion` through the `catversion.commands` entry point group; building the
parser imports neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from catversion import layout, storage
from catversion.errors import CLIError, UsageError
from catversion.limits import BUILTIN_MODELS, DEFAULT_MODEL, DEVICE_HELP, PRECISION_CHOICES, PRECISION_HELP, device_arg

DESCRIPTION = f"""\
Serve every residual {layout.RESIDUAL_PATTERN} (PREFIX: the `catversion batch --output`) behind an
OpenAI-Images-compatible HTTP API: POST /v1/images/generations with "model": <concept id>,
<concept id>@<sha256 prefix> or "base" (stream, png/jpeg/webp, url responses, WIDTHxHEIGHT sizes),
GET /v1/models, GET /livez and /readyz (/healthz), OpenAPI schema at /docs. Residuals load on first
use, are cached and are revalidated against storage every residual_ttl_s (5 s). Every request's samples
join the running UNet batch at the next denoising step, whatever their concept, step count or guidance.
Every error is an OpenAI error body. A generator replica holds at most max_queued_work ahead of a new
request (UNet steps x rows; default one full batch of default requests): past it a request is refused
at once with 429 and Retry-After. /readyz is 200 only while a generator replica is warm.

Each generator replica warms up before it takes requests: with --compile (the default on a GPU) the
UNet is compiled once and a CUDA graph is recorded per batch size (1-2 minutes on a GPU); the time
is logged and shown by GET /readyz.

--config takes a Ray Serve config YAML; flags given here override its `args`:
  serve/config.yaml      GPU replicas (1 GPU each), for a GPU machine or a cluster (`serve deploy`)
  serve/config-cpu.yaml  the same application on this machine's CPU (after `make demo`:
                         catversion serve --config serve/config-cpu.yaml)
Before anything starts, the replicas' resources are checked against the cluster: a request that can
never be placed (e.g. a GPU replica on a machine without one) fails at once, naming the flag to change
(--gpus-per-replica 0 serves on the CPU). Ctrl-C or SIGTERM shuts Serve (and a Ray it started) down.
"""


def gpus_arg(text: str) -> float:
    """argparse `type=` for --gpus-per-replica: a number >= 0 (a fraction below 1, else a whole number)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of GPUs >= 0, got {text!r}")
    if value > 1 and not value.is_integer():
        raise argparse.ArgumentTypeError(f"more than one GPU per replica must be a whole number, got {text!r}")
    return value


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve residuals over an OpenAI-compatible HTTP API (Ray Serve)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--residuals", metavar="PREFIX",
                   help=f"s3://bucket/prefix or a folder holding {layout.RESIDUAL_PATTERN.removeprefix('PREFIX/')}")
    p.add_argument("--model", action="append",
                   help=f"base model: {' | '.join(BUILTIN_MODELS)} | a diffusers folder | a hub id (default: "
                        f"{DEFAULT_MODEL}); repeat it to serve several base models (any family) from one endpoint, "
                        "each with its own generator deployment: the first is \"base\", each concept goes to the one "
                        "its residual was trained on")
    p.add_argument("--config", help="Ray Serve config YAML: serve/config.yaml (GPU replicas) or serve/config-cpu.yaml (CPU)")
    p.add_argument("--host", help="HTTP host (default: 127.0.0.1, or the config's)")
    p.add_argument("--port", type=int, help="HTTP port (default: 8000, or the config's)")
    p.add_argument("--api-key-file", help="file with one API key per line; requests must send 'Authorization: Bearer KEY'")
    p.add_argument("--device", type=device_arg, help=f"{DEVICE_HELP} (default: auto, or the config's)")
    p.add_argument("--gpus-per-replica", type=gpus_arg, metavar="N",
                   help="GPUs Ray reserves for each generator replica; 0 serves on the CPU (default: the config's "
                        "`gpus_per_replica`, else 0)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, help=f"{PRECISION_HELP} (default: auto, or the config's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the UNet with a CUDA graph per batch size, warmed up before a replica serves "
                        "(default: on when the replica runs on CUDA, or the config's `compile`)")
    p.add_argument("--address", help="Ray cluster to join: HOST:PORT, ray://HOST:PORT or auto (default: RAY_ADDRESS when "
                                     "set, else a new local Ray of this command's own, never one already running)")
    p.add_argument("--quiet", action="store_true",
                   help="print only the 'serving ... at URL' line, warnings and errors")
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
    for flag, key in (("residuals", "residuals"), ("api_key_file", "api_key_file"), ("device", "device"),
                      ("precision", "precision")):
        if getattr(args, flag):
            app_args[key] = getattr(args, flag)
    if args.model:  # the first is the default base model, the others are served beside it
        app_args["model"], app_args["models"] = args.model[0], list(args.model[1:]) or None
    if getattr(args, "gpus_per_replica", None) is not None:
        app_args["gpus_per_replica"] = args.gpus_per_replica
        actor = app_args.get("deployment_options", {}).get("Generator", {}).get("ray_actor_options") or {}
        if "num_gpus" in actor:  # the flag wins over the config's own ray_actor_options too
            actor["num_gpus"] = args.gpus_per_replica
    if args.compile is not None:
        app_args["compile"] = "on" if args.compile else "off"
    if not app_args.get("residuals"):
        raise UsageError("--residuals PREFIX is required (or `args.residuals` in --config)")
    if str(app_args.get("device", "auto")).startswith("cuda") and not app_args.get("gpus_per_replica"):
        raise UsageError(f"--device {app_args['device']} needs a GPU per replica, but --gpus-per-replica is 0 "
                         "(give --gpus-per-replica 1, or --device cpu or auto)")
    return app_args, http


def replica_requests(application) -> list:
    """What each deployment of a built application asks Ray for: one `cluster.Request` per deployment
    (resources of one replica, and how many replicas must run at once: its minimum, at least one)."""
    from catversion.cluster import Request

    deployments, todo = {}, [application]
    while todo:  # the ingress and the deployments bound into its arguments
        deployment = todo.pop()._bound_deployment
        deployments[deployment.name] = deployment
        todo += [a for a in (*deployment.init_args, *deployment.init_kwargs.values()) if hasattr(a, "_bound_deployment")]
    requests = []
    for name, deployment in deployments.items():
        options = deployment.ray_actor_options or {}
        each = {"CPU": float(options.get("num_cpus", 1)), "GPU": float(options.get("num_gpus") or 0)}
        each.update({key: float(value) for key, value in (options.get("resources") or {}).items()})
        autoscaling = deployment._deployment_config.autoscaling_config
        count = autoscaling.min_replicas if autoscaling is not None else deployment.num_replicas
        generator = name == "Generator" or name.startswith("Generator-")  # one per base model served
        what = ("generator replica" if name == "Generator" else f"generator replica ({name})" if generator
                else f"{name.lower()} replica")
        flags = {"CPU": f"a smaller num_cpus (ray_actor_options of {name} in --config)"}
        if generator:
            flags["GPU"] = "--gpus-per-replica 0"
        requests.append(Request(what, max(1, int(count or 0)), each, flags=flags,
                                count_flag=f"min_replicas of {name} in --config"))
    return requests


class _Signals:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt wherever the command is (deploying, or serving); once
    it shuts down, further signals are ignored so the shutdown finishes. The previous handlers come back."""

    def __init__(self) -> None:
        self.closing = False
        self.previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        if not self.closing:
            self.closing = True
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def __enter__(self) -> "_Signals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (a test): the caller's handling stays
                pass
        return self

    def __exit__(self, *_exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    from catversion.cluster import check_resources, connect

    from .app import build_app, read_keys

    quiet = getattr(args, "quiet", False)

    def say(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    app_args, http = application_args(args)
    if args.api_key_file and not Path(args.api_key_file).is_file():
        raise CLIError(f"--api-key-file {args.api_key_file} does not exist")
    if app_args.get("api_key_file"):  # a bad key file fails here, with its line number, not in a replica's log
        read_keys(app_args["api_key_file"])
    # Replicas run in their own folders: relative local paths must mean what they mean here.
    app_args["residuals"] = storage.absolute(app_args["residuals"])
    if app_args.get("api_key_file"):
        app_args["api_key_file"] = storage.absolute(app_args["api_key_file"])
    if app_args.get("model"):
        app_args["model"] = storage.absolute_model(app_args["model"])
    if app_args.get("models"):
        app_args["models"] = [storage.absolute_model(m) for m in app_args["models"]]
    host = args.host or (http.get("host") if args.config else None) or "127.0.0.1"
    port = args.port or http.get("port") or 8000
    application = build_app(app_args)
    requests = replica_requests(application)

    started_ray = started_serve = False  # a Ray this process already uses (a test's) is left running
    with _Signals() as signals:
        try:
            started_ray = connect(args.address, **({"logging_level": logging.WARNING} if quiet else {}))
            if quiet:  # Ray's and Serve's own progress lines on this side ("Started Serve", "ready at")
                for name in ("ray", "ray.serve"):
                    logging.getLogger(name).setLevel(logging.WARNING)
            for request in requests:  # fail now, not after waiting forever for resources
                check_resources(request)
            generator = next(r for r in requests if r.what == "generator replica")
            gpus = generator.each.get("GPU", 0.0)
            if gpus:
                compiles = " compiles," if app_args.get("compile", "auto") != "off" else ""
                say(f"starting {generator.count} generator replica(s) with {gpus:g} GPU each; each loads the model,"
                    f"{compiles} and warms up before serving (1-2 min on a GPU)")
            else:
                say(f"starting {generator.count} generator replica(s) on the CPU; each loads the model and warms up "
                    f"before serving")
            started_serve = True
            serve.start(http_options={"host": host, "port": port})
            serve.run(application, name="catversion", route_prefix="/")
            shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            print(f"serving {app_args['residuals']} at http://{shown}:{port}/v1 (OpenAPI docs at /docs); Ctrl-C to stop",
                  flush=True)
            while True:  # until Ctrl-C or SIGTERM (the handler raises KeyboardInterrupt)
                time.sleep(3600)
        except KeyboardInterrupt:
            signals.closing = True
            say("shutting down")
            raise
        finally:
            signals.closing = True
            if started_serve:
                serve.shutdown()
            if started_ray:
                ray.shutdown()

