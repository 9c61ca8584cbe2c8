"""The `catversion` command: one subcommand per user task, each a thin layer over the library.

This is the composition root. The library's own commands are defined here; the Ray jobs
(`batch`, `evaluate`) and the server (`serve`) register theirs through the `catversion.commands`
entry point group, so the library never imports `pipelines/` or `serve/`. Building the parser
(and so `--help`) imports neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from importlib.metadata import entry_points
from pathlib import Path

from . import __version__, limits, progress
from .errors import EXIT_ERROR, EXIT_INTERRUPTED, CLIError
from .recipe import DEFAULT_SAVE_STEPS, REFERENCE_PREFIX_LOGIT_BIAS, TrainConfig, check_class_word
from .storage import StorageError

COMMANDS_GROUP = "catversion.commands"  # entry points: name = "module:register", register(subparsers)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

EPILOG = """\
Run `catversion COMMAND --help` for the options of each command.

exit status: 0 all done; 1 error; 2 usage error; 3 finished, but some concepts failed or were
rejected (batch, batch --validate-only, evaluate); 130 interrupted (Ctrl-C or SIGTERM)."""


def class_word_arg(text: str) -> str:
    """argparse `type=` for --class-word: an empty word is a usage error."""
    try:
        return check_class_word(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def layers_arg(text: str) -> tuple[tuple[int, ...], ...]:
    """argparse `type=` for --layers: "9,10,11", or per text encoder "8,9,10;28,29,30" (checked against the model later)."""
    from .families import parse_layers

    try:
        return parse_layers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_import_official(args: argparse.Namespace) -> None:
    from .residual import Residual

    src = Path(args.src)
    if src.is_dir():
        src = src / "pytorch_adapter.bin"
    residual = Residual.from_official(src, class_word=args.class_word)
    residual.save(args.out)
    print(f"imported {src} -> {args.out} ({residual})")


def _cmd_export_official(args: argparse.Namespace) -> None:
    from .residual import Residual

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
    from .residual import Residual

    residual = Residual.load(args.residual)
    shape = {"layers": list(residual.layers), "hidden_size": residual.hidden_size} if len(residual.blocks) == 1 else {}
    info = {
        **shape,
        "blocks": [block.describe() for block in residual.blocks],  # one per text encoder it patches
        "tokens": residual.tokens,
        "prefix_logit_bias": residual.prefix_logit_bias,
        **residual.meta,
    }
    print(json.dumps(info, indent=2, sort_keys=True, default=str))


def _load_model(name: str, device: str, precision: str, components: tuple[str, ...] | None = None):
    from .models import COMPONENTS, ModelNotAvailableError, load_base_model, resolve_device

    try:
        return load_base_model(name, device=resolve_device(device), precision=precision,
                               components=components or COMPONENTS)
    except ModelNotAvailableError as exc:
        raise CLIError(str(exc)) from None


def _expand_images(paths: list[str]) -> list[Path]:
    """Files as given; folders contribute their image files (sorted), so `--images photos/` works."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise CLIError(f"--images {raw}: folder has no image files ({', '.join(IMAGE_SUFFIXES)})")
            found += images
        elif path.is_file():
            found.append(path)
        else:
            raise CLIError(f"--images {raw}: no such file or folder")
    return found


def _parse_steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers like 250,500,750, got {text!r}") from None


def _checkpoint_path(out: Path, step: int) -> Path:
    return out.with_name(f"{out.stem}.step{step}{out.suffix}")


def _cmd_train(args: argparse.Namespace) -> None:
    from .residual import Residual
    from .training import Concept, ResidualTrainer

    images = _expand_images(args.images)
    try:
        config = TrainConfig(
            steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed,
            save_steps=args.save_steps, prefix_logit_bias=args.prefix_logit_bias,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    out = Path(args.out)
    base = _load_model(args.model, args.device, args.precision)
    try:
        trainer = ResidualTrainer(base, pack=1, resolution=args.resolution, compile=args.compile, layers=args.layers)
    except ValueError as exc:  # layers that the model's encoders do not have, say
        raise CLIError(f"--layers: {exc}" if args.layers else str(exc)) from None
    concept = Concept(out.stem, images, args.class_word, args.caption, config)
    print(f"training {out.stem!r} on {len(images)} images, class word {args.class_word!r}, "
          f"{config.steps} steps, model {base.model_id} ({base.family.title}) on {base.device} (UNet/VAE "
          f"{base.precision}, text encoder fp32{', UNet compiled' if trainer.compiled else ''}), layers "
          f"{_layers_text(trainer.encoder)}", file=sys.stderr)
    saved: list[Path] = []

    def checkpoint(_concept_id: str, step: int, residual: Residual) -> None:
        path = _checkpoint_path(out, step)
        residual.save(path)
        saved.append(path)

    with progress.bar(config.steps, "train", "step", args.quiet) as bar:
        def show(p) -> None:
            bar.update(p.steps_done - bar.n)
            bar.set_postfix(loss=f"{p.loss:.4f}", img_s=f"{p.images_per_s:.1f}", refresh=False)

        result = trainer.train([concept], on_progress=show, on_checkpoint=checkpoint)[0]
    if result.status != "ok":
        raise CLIError(result.error)
    result.residual.save(out)
    if trainer.compiled:
        print(f"compiling the UNet took {trainer.compile_seconds:.1f} s", file=sys.stderr)
    for path in saved:
        print(f"checkpoint: {path}")
    print(f"residual: {out} (final loss {result.final_loss:.4f}, {result.seconds:.1f} s)")


def _cmd_generate(args: argparse.Namespace) -> None:
    from .generation import GenerationRequest, ImageGenerator
    from .residual import IncompatibleResidualError, Residual

    residual = Residual.load(args.residual) if args.residual else None
    model = args.model or (residual.meta.get("base_model") if residual else None)
    if not model:
        raise CLIError(
            f"{args.residual} does not record its base model (imported from the reference code?); "
            "pass --model with the Stable Diffusion folder or hub id it was trained on"
        )
    base = _load_model(model, args.device, args.precision)
    try:
        if residual is not None:  # another family's residual: say so, before its layers fail to fit
            residual.check_compatible(base.text_encoders, strict=False, family=base.family.name,
                                      base_model=base.model_id)
        generator = ImageGenerator(base, layers=residual.layer_sets if residual else None,
                                   tokens=residual.tokens if residual else 1)
    except IncompatibleResidualError as exc:
        raise CLIError(f"{args.residual}: {exc}") from None
    except ValueError as exc:  # a residual whose layers this model's encoders do not have
        raise CLIError(f"{args.residual}: {exc}; it was trained for another base model") from None
    prompt = args.prompt
    requests = [
        GenerationRequest(prompt, residual, args.seed + i, args.residual_scale, args.negative_prompt) for i in range(args.n)
    ]
    generator.check(requests, args.steps, args.guidance, args.size or base.resolution)
    with progress.bar(args.steps, "generate", "step", args.quiet) as bar:
        images = generator.generate(
            requests, steps=args.steps, guidance=args.guidance, size=args.size,
            on_step=lambda done, _total: bar.update(done - bar.n),
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
        print(f"image: {path}")


def _cmd_layers(args: argparse.Namespace) -> None:
    from . import layerprofile

    if args.plot and Path(args.plot).suffix.lower() not in layerprofile.PLOT_SUFFIXES:
        raise CLIError(f"--plot {args.plot}: use a {' or '.join(layerprofile.PLOT_SUFFIXES)} file name")
    prompts = layerprofile.read_prompts(args.prompts) if args.prompts else list(layerprofile.DEFAULT_PROMPTS)
    base = _load_model(args.model, args.device, "fp32", components=("tokenizer", "text_encoder"))
    profiles = layerprofile.profile_model(base, prompts)
    source = args.prompts or "the built-in prompts"
    plot = None
    if args.plot:
        plot = layerprofile.plot_profiles(profiles, args.plot, f"{base.model_id} ({base.family.title}), "
                                          f"{len(prompts)} prompts")
    if args.json:
        print(json.dumps({
            "model": base.model_id, "family": base.family.name, "prompts": len(prompts), "prompt_source": source,
            "window": layerprofile.WINDOW, "plot": str(plot) if plot else None,
            "encoders": [profile.to_dict() for profile in profiles],
        }, indent=2))
        return
    print(f"model {base.model_id} ({base.family.title}); {len(prompts)} prompts from {source}")
    print("integration: share of a word's attention that goes to the other words of the prompt\n"
          "  (not to itself or the start token); mixing: 1 - cos(a token's hidden state into, out of the layer)")
    for profile in profiles:
        print()
        print(layerprofile.format_profile(profile))
    if plot:
        print(f"\nplot: {plot}")


def _layers_text(conditioner) -> str:
    return "; ".join(f"{p.name} {','.join(map(str, p.layers))}" for p in conditioner.parts)


def _model_help() -> str:
    return f"base model: {' | '.join(limits.BUILTIN_MODELS)} | a diffusers folder | a hub id"


def _add_train(sub: argparse._SubParsersAction) -> None:
    defaults = TrainConfig()
    save_steps = ",".join(str(s) for s in DEFAULT_SAVE_STEPS if s < defaults.steps)
    p = sub.add_parser(
        "train",
        help="learn a residual for one concept from a few photos",
        description="Optimize a CatVersion residual (extra K/V in the last 3 self-attention layers that feed the UNet, "
        "in every text encoder it reads: SDXL's two) for one concept, on a Stable Diffusion 1.x, 2.x or XL model. "
        f"Defaults are the reference recipe: AdamW (lr {defaults.learning_rate:g}, weight decay "
        f"{defaults.weight_decay:g}), batch {defaults.batch_size}, {defaults.steps} steps, N(0, 1) init, native "
        "resolution (512 px SD1.x, 768 SD 2.x at v-prediction, 1024 SDXL), random horizontal flips, caption = the "
        f"class word, and the reference code's +{REFERENCE_PREFIX_LOGIT_BIAS:g} residual logit bias (an SD1.x result "
        "exports to pytorch_adapter.bin).",
    )
    p.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files or folders of images (3-10 photos)")
    p.add_argument("--class-word", required=True, type=class_word_arg,
                   help="the plain base-class word, e.g. 'teapot' (also the prompt word)")
    p.add_argument("--out", required=True, help="output residual, e.g. teapot.safetensors")
    p.add_argument("--model", default=limits.DEFAULT_MODEL, help=f"{_model_help()} (default: {limits.DEFAULT_MODEL})")
    p.add_argument("--caption", help="training caption (default: the class word alone)")
    p.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=defaults.learning_rate, help="learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step (default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    p.add_argument("--resolution", type=int, help="training image size in px (default: the model's native size)")
    p.add_argument("--layers", type=layers_arg, metavar="L",
                   help="encoder layers to patch: '9,10,11', or one group per text encoder separated by ';' "
                        "('8,9,10;28,29,30' for SDXL) (default: the last three feeding the UNet in each encoder; "
                        "`catversion layers` profiles them)")
    p.add_argument(
        "--save-steps", type=_parse_steps, default=DEFAULT_SAVE_STEPS,
        help=f"also save OUT.stepN.safetensors at these steps, comma-separated (default: {save_steps}); '' for none",
    )
    p.add_argument(
        "--prefix-logit-bias", type=float, default=defaults.prefix_logit_bias,
        help="logit added to the residual tokens in attention: 1 = the reference code's recipe (exports to "
        "pytorch_adapter.bin), 0 = the paper's equation as written (default: %(default)s)",
    )
    p.add_argument("--device", type=limits.device_arg, default="auto", help=f"{limits.DEVICE_HELP} (default: auto)")
    p.add_argument("--precision", choices=limits.PRECISION_CHOICES, default=limits.DEFAULT_PRECISION,
                   help=f"{limits.PRECISION_HELP} (default: %(default)s); recorded in the residual")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: the first steps compile (a minute or two for SD1.5 on a GPU), "
                        "so it pays off only for long runs; `catversion batch` compiles on GPUs by default")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images with a residual (or the plain base model)",
        description="Generate images for a prompt with a residual. Use the residual's class word in the prompt, "
        "e.g. 'a teapot on a beach'. Defaults are the reference inference settings: DDIM 50 steps, guidance 10.",
    )
    p.add_argument("--residual", help="residual .safetensors: a path, file:// or s3:// URI (omit for the plain base model)")
    p.add_argument("--prompt", required=True, help="text prompt, containing the class word")
    p.add_argument("--out", required=True, help="output PNG; with --n > 1, OUT-0.png, OUT-1.png, ...")
    p.add_argument("--model", help=f"{_model_help()} (default: the base model recorded in the residual)")
    p.add_argument("--n", type=int, default=1, help="number of images (seeds SEED, SEED+1, ...; default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default: 0)")
    p.add_argument("--steps", type=int, default=limits.DEFAULT_STEPS, help="DDIM steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=limits.DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale (default: %(default)s)")
    p.add_argument("--residual-scale", type=float, default=1.0,
                   help=f"strength of the residual, 0 = off, up to {limits.MAX_RESIDUAL_SCALE:g} (default: 1)")
    p.add_argument("--negative-prompt", default="", help="negative prompt, encoded without the residual")
    p.add_argument("--size", type=int, help="image size in px (default: the model's native size)")
    p.add_argument("--device", type=limits.device_arg, default="auto", help=f"{limits.DEVICE_HELP} (default: auto)")
    p.add_argument("--precision", choices=limits.PRECISION_CHOICES, default=limits.DEFAULT_PRECISION,
                   help=f"{limits.PRECISION_HELP} (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)


def _add_official_formats(sub: argparse._SubParsersAction) -> None:
    """import-official and export-official: the reference code's pytorch_adapter.bin, both ways."""
    p = sub.add_parser(
        "import-official",
        help="convert a reference-code pytorch_adapter.bin into a .safetensors residual",
        description="Read the CatVersion reference code's pytorch_adapter.bin (adapter-transformers prefix tuning, "
        "layers 9-11) and write a catversion residual. Imported residuals keep the reference code's +1.0 "
        "residual logit (prefix_logit_bias=1.0) so they generate what the reference code generates. The reference "
        "code is Stable Diffusion 1.x only, and so is its format: generate them with an SD 1.x --model.",
    )
    p.add_argument("src", help="pytorch_adapter.bin, or the folder holding it (and its adapter_config.json)")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--class-word", type=class_word_arg,
                   help="the base-class word the concept was trained with, e.g. 'teapot'")
    p.set_defaults(func=_cmd_import_official)

    p = sub.add_parser(
        "export-official",
        help="write a residual in the reference code's pytorch_adapter.bin layout",
        description="Write a residual as the reference code's pytorch_adapter.bin (4 keys sharing one fp32 storage). "
        "If OUT does not end in .bin it is a folder and gets pytorch_adapter.bin plus adapter_config.json. "
        "Stable Diffusion 1.x residuals only (the reference code's format has no SD 2.x or SDXL form).",
    )
    p.add_argument("src", help="input .safetensors residual: a path, file:// or s3:// URI")
    p.add_argument("out", help="output .bin file, or a folder")
    p.add_argument(
        "--force",
        action="store_true",
        help=f"export even if the residual was trained with a prefix_logit_bias other than the reference code's "
        f"{REFERENCE_PREFIX_LOGIT_BIAS:g} (e.g. --prefix-logit-bias 0); it then behaves differently there",
    )
    p.set_defaults(func=_cmd_export_official)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="print a residual's metadata", description="Verify a residual file and print its header.")
    p.add_argument("residual", help=".safetensors residual: a path, file:// or s3:// URI")
    p.set_defaults(func=_cmd_inspect)


def _add_layers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "layers",
        help="profile the text encoder(s) per layer and suggest which layers to patch",
        description="The paper's layer analysis for any base model: for each text encoder the UNet reads, per "
        "layer, how much a word's attention goes to the other words of the prompt (integration) and how much the "
        "layer changes the tokens (mixing), over a set of prompts; then the 3 consecutive layers feeding the UNet "
        "with the highest integration, beside the family's default. Random-weight built-ins (tiny, ...) show "
        "nothing meaningful. See docs/layers.md.",
    )
    p.add_argument("--model", default=limits.DEFAULT_MODEL, help=f"{_model_help()} (default: {limits.DEFAULT_MODEL})")
    p.add_argument("--prompts", metavar="FILE", help="prompts, one per line (default: 16 built-in varied prompts)")
    p.add_argument("--json", action="store_true", help="print one JSON object: per encoder, per-layer numbers "
                   "and the suggested and default windows")
    p.add_argument("--plot", metavar="PATH", help="also draw the profile per encoder into PATH (.svg or .png)")
    p.add_argument("--device", type=limits.device_arg, default="auto", help=f"{limits.DEVICE_HELP} (default: auto)")
    p.set_defaults(func=_cmd_layers)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: the library's commands, then those registered under COMMANDS_GROUP."""
    parser = argparse.ArgumentParser(
        prog="catversion",
        description="CatVersion personalization for Stable Diffusion v1.x: train, generate, batch and serve residuals.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"catversion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_train, _add_generate, _add_official_formats, _add_inspect, _add_layers):
        add(sub)
    # The Ray jobs and the server register their own commands (see COMMANDS_GROUP).
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        entry.load()(sub)
    return parser


def _interrupt(signum, _frame) -> None:
    """SIGTERM ends a command as Ctrl-C does: each command stops cleanly and keeps what it finished."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (see EPILOG: 0, 1, 2 from argparse, 3, 130)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread (main() called from a test thread): Ctrl-C handling only
        previous = None
    try:
        args.func(args)
    except CLIError as exc:
        print(f"catversion {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (FileNotFoundError, ValueError, StorageError) as exc:
        # ValueError covers bad inputs the library names (an undecodable image, an invalid size, a residual
        # that is corrupt or does not fit: ResidualFormatError and IncompatibleResidualError are ValueErrors).
        print(f"catversion {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"catversion {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
