"""The `catversion` command: one subcommand per user task, each a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .residual import IncompatibleResidualError, Residual, ResidualFormatError

EPILOG = "Run `catversion COMMAND --help` for the options of each command."


class CLIError(Exception):
    """An error the user can fix; printed without a traceback, exit status 2."""


def _cmd_import_official(args: argparse.Namespace) -> None:
    src = Path(args.src)
    if src.is_dir():
        src = src / "pytorch_adapter.bin"
    residual = Residual.from_official(src, class_word=args.class_word)
    residual.save(args.out)
    print(f"imported {src} -> {args.out} ({residual})")


def _cmd_export_official(args: argparse.Namespace) -> None:
    residual = Residual.load(args.src)
    out = Path(args.out)
    if out.suffix != ".bin":
        # A folder gets the pair the reference code's load_adapter() expects.
        out.mkdir(parents=True, exist_ok=True)
        residual.to_official(out / "pytorch_adapter.bin", force=args.force)
        (out / "adapter_config.json").write_text(json.dumps(residual.official_adapter_config(), indent=2) + "\n")
        print(f"exported {args.src} -> {out}/pytorch_adapter.bin and adapter_config.json")
    else:
        residual.to_official(out, force=args.force)
        print(f"exported {args.src} -> {out}")


def _cmd_inspect(args: argparse.Namespace) -> None:
    residual = Residual.load(args.residual)
    info = {
        "layers": list(residual.layers),
        "tokens": residual.tokens,
        "hidden_size": residual.hidden_size,
        "prefix_logit_bias": residual.prefix_logit_bias,
        **residual.meta,
    }
    print(json.dumps(info, indent=2, sort_keys=True, default=str))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catversion",
        description="CatVersion personalization for Stable Diffusion v1.x: train, generate, batch and serve residuals.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "import-official",
        help="convert a reference-code pytorch_adapter.bin into a .safetensors residual",
        description="Read the CatVersion reference code's pytorch_adapter.bin (adapter-transformers prefix tuning, "
        "layers 9-11) and write a catversion residual. Imported residuals keep the reference code's +1.0 "
        "residual logit (prefix_logit_bias=1.0) so they generate what the reference code generates.",
    )
    p.add_argument("src", help="pytorch_adapter.bin, or the folder holding it (and its adapter_config.json)")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--class-word", help="the base-class word the concept was trained with, e.g. 'teapot'")
    p.set_defaults(func=_cmd_import_official)

    p = sub.add_parser(
        "export-official",
        help="write a residual in the reference code's pytorch_adapter.bin layout",
        description="Write a residual as the reference code's pytorch_adapter.bin (4 keys sharing one fp32 storage). "
        "If OUT does not end in .bin it is a folder and gets pytorch_adapter.bin plus adapter_config.json.",
    )
    p.add_argument("src", help="input .safetensors residual")
    p.add_argument("out", help="output .bin file, or a folder")
    p.add_argument(
        "--force",
        action="store_true",
        help="export even if the residual was trained with a prefix_logit_bias other than the reference code's 1.0",
    )
    p.set_defaults(func=_cmd_export_official)

    p = sub.add_parser("inspect", help="print a residual's metadata", description="Verify a residual file and print its header.")
    p.add_argument("residual", help=".safetensors residual")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CLIError, ResidualFormatError, IncompatibleResidualError, FileNotFoundError, ValueError) as exc:
        print(f"catversion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"catversion {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
