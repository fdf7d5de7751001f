"""The `captioner` and `caption` commands: argument parsing and error-to-exit-code mapping only.

Every stage flag is a shorthand for a config field (`--images DIR` sets
`features.images`); any field can also be set with a dotted override
(`--train.epochs=20`) or a JSON file (`--config FILE`). Precedence, lowest first:
defaults, the config file, the flags, the dotted overrides.

Exit codes: 0 success; 1 a stage finished but some inputs failed (e.g. `caption`
on an unreadable file); 2 a user error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from captioner import cache, layout, runtime
from captioner import config as config_lib
from captioner.data import sources
from captioner.data.demo import make_demo_data
from captioner.decoding.inference import iter_caption_files
from captioner.engines.caption_batch import caption_batch
from captioner.engines.extract import extract_engine
from captioner.errors import CaptionerError
from captioner.stages.evaluation import evaluate_stage
from captioner.stages.export import export_stage
from captioner.stages.features import extract_stage, merge_feature_parts
from captioner.stages.finetune import finetune_stage
from captioner.stages.prepare import prepare_stage
from captioner.stages.training import train_stage
from captioner.vision.quantize import quantize_config_stage

log = logging.getLogger("captioner")

# Flag -> config field, per subcommand. The flags are the contract in DESIGN.md.
FLAG_FIELDS: dict[str, dict[str, str]] = {
    "demo-data": {"output": "demo.output", "images": "demo.images", "seed": "demo.seed"},
    "extract": {
        "images": "features.images",
        "output": "features.output",
        "backbone": "features.backbone",
        "layer": "features.layer",
        "weights": "features.weights",
        "shard": "features.shard",
        "engine": "engine.name",
        "ray_address": "engine.ray_address",
        "image_column": "engine.image_column",
        "id_column": "engine.id_column",
    },
    "caption-batch": {
        "inputs": "caption_batch.inputs",
        "model": "caption_batch.model",
        "output": "caption_batch.output",
        "backbone_weights": "caption_batch.backbone_weights",
        "beam": "decode.beam_size",
        "engine": "engine.name",
        "ray_address": "engine.ray_address",
        "image_column": "engine.image_column",
        "id_column": "engine.id_column",
    },
    "quantize": {
        "backbone": "quantize.backbone",
        "layer": "quantize.layer",
        "weights": "quantize.weights",
        "images": "quantize.images",
        "output": "quantize.output",
    },
    "prepare": {"captions": "text.captions", "splits": "text.splits", "output": "text.output"},
    "train": {"features": "train.features", "captions": "train.captions", "output": "train.output"},
    "finetune": {
        "model": "finetune.model",
        "features": "finetune.features",
        "captions": "finetune.captions",
        "output": "finetune.output",
    },
    "evaluate": {
        "model": "eval.model",
        "features": "eval.features",
        "captions": "eval.captions",
        "split": "eval.split",
        "beam": "decode.beam_size",
        "images": "eval.images",
        "output": "eval.output",
    },
    "export": {"model": "export.model", "output": "export.output"},
    "caption": {"model": "eval.model", "beam": "decode.beam_size"},
    "serve": {
        "model": "eval.model",
        "host": "serve.host",
        "port": "serve.port",
        "cors_origin": "serve.cors_origin",
        "allowed_host": "serve.allowed_hosts",
    },
}


# Subcommands that run a Keras model (the others never import the backend); evaluate and serve
# with bundles (`captioner.decoding.bundle`) run without it.
KERAS_COMMANDS = frozenset({"extract", "quantize", "train", "finetune", "evaluate", "serve", "export", "caption-batch"})
# What the `train` extra adds to the base install (the TensorFlow-free runtime): a command that
# needs one of them on a base install says so in one line.
TRAIN_EXTRA_MODULES = frozenset({"tensorflow", "keras", "h5py", "nltk"})


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so errors stay one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CaptionerError(message)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="JSON file of config sections to start from")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="captioner", description="Image captioning pipeline (see README.md).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_image_commands(commands)
    _add_backbone_commands(commands)
    _add_training_commands(commands)
    _add_model_commands(commands)
    return parser


def _add_image_commands(commands: Any) -> None:
    """The subcommands demo-data, extract, caption-batch: images in, features or captions out."""
    sub = commands.add_parser("demo-data", help="generate the procedural demo data set")
    sub.add_argument("--output", metavar="DIR")
    sub.add_argument("--images", metavar="N")
    sub.add_argument("--seed", metavar="S")
    sub.add_argument("--force", action="store_true", help="regenerate even if up to date; write into a folder "
                     "that holds no demo set")

    sub = commands.add_parser("extract", help="stage 1: image folder, WebDataset shards or parquet -> features cache")
    sub.add_argument("--images", metavar="DIR|SHARDS|PARQUET", nargs="+",
                     help="an image folder, WebDataset .tar shards (or a glob of them), or .parquet files")
    sub.add_argument("--output", metavar="FILE.pkl")
    sub.add_argument("--backbone", metavar="NAME", help="vgg16 (default), vgg19, resnet50, inception_v3, "
                     "mobilenet_v2, efficientnet_b0")
    sub.add_argument("--layer", metavar="LAYER", help="default: the backbone's (fc2, or the pooled layer); "
                     "with a .tflite: a tensor name")
    sub.add_argument("--weights", metavar="imagenet|none|PATH.h5|PATH.tflite")
    sub.add_argument("--shard", metavar="i/N")
    sub.add_argument("--force", action="store_true", help="rerun even if up to date; replace an output file "
                     "that no extraction wrote")
    _add_engine_flags(sub)

    sub = commands.add_parser("caption-batch", help="caption many images (folders, shards, parquet) into one file")
    sub.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="an image folder, WebDataset .tar shards (or a glob), or .parquet files")
    sub.add_argument("--model", metavar="MODEL_DIR|BUNDLE")
    sub.add_argument("--output", metavar="FILE.parquet|FILE.jsonl")
    sub.add_argument("--beam", metavar="K")
    sub.add_argument("--backbone-weights", metavar="FILE",
                     help="the .h5/.tflite file the model's features were made with, when not at its recorded path")
    _add_engine_flags(sub)
    sub.add_argument("--force", action="store_true", help="rerun even if up to date; replace an output file "
                     "that no caption-batch wrote")


def _add_backbone_commands(commands: Any) -> None:
    """The subcommands quantize, merge-features."""
    sub = commands.add_parser("quantize", help="a catalogue backbone -> a full-int8 .tflite feature extractor")
    sub.add_argument("--backbone", metavar="NAME", help="default mobilenet_v2")
    sub.add_argument("--layer", metavar="LAYER", help="the feature layer (default: the backbone's)")
    sub.add_argument("--weights", metavar="imagenet|none|PATH.h5")
    sub.add_argument("--images", metavar="DIR", help="photos to calibrate on (and to measure the int8 error)")
    sub.add_argument("--output", metavar="FILE.tflite")
    sub.add_argument("--force", action="store_true", help="replace an output file that no quantize wrote")

    sub = commands.add_parser("merge-features", help="join shard part files into one features cache")
    sub.add_argument("parts", nargs="+", metavar="PART.pkl")
    sub.add_argument("--output", metavar="FILE.pkl", required=True)
    sub.add_argument("--force", action="store_true", help="rerun even if up to date; replace an output file "
                     "that no merge wrote")


def _add_training_commands(commands: Any) -> None:
    """The subcommands prepare, train, finetune."""
    sub = commands.add_parser("prepare", help="stage 2: captions -> cleaned splits + tokenizer")
    sub.add_argument("--captions", metavar="TOKEN_FILE|KARPATHY.json|SHARDS", nargs="+")
    sub.add_argument("--splits", metavar="DIR")
    sub.add_argument("--output", metavar="DIR")
    sub.add_argument("--force", action="store_true", help="rerun even if up to date; write into a folder that "
                     "holds no prepared captions")

    sub = commands.add_parser("train", help="stage 3: features + captions -> model directory")
    sub.add_argument("--features", nargs="+", metavar="FILE")
    sub.add_argument("--captions", metavar="DIR")
    sub.add_argument("--output", metavar="MODEL_DIR")
    sub.add_argument("--resume", action="store_true", help="continue an interrupted run")
    sub.add_argument("--force", action="store_true", help="start over even if up to date or resumable")

    sub = commands.add_parser("finetune", help="self-critical training (SCST) on CIDEr-D: model -> new model directory")
    sub.add_argument("--model", metavar="MODEL_DIR", help="the cross-entropy model to start from (never written)")
    sub.add_argument("--features", nargs="+", metavar="FILE")
    sub.add_argument("--captions", metavar="DIR")
    sub.add_argument("--output", metavar="NEW_DIR")
    sub.add_argument("--resume", action="store_true", help="continue an interrupted run")
    sub.add_argument("--force", action="store_true", help="start over even if up to date or resumable")


def _add_model_commands(commands: Any) -> None:
    """The subcommands evaluate, export, serve."""
    sub = commands.add_parser("evaluate", help="stage 4: caption a split, BLEU/CIDEr, HTML report")
    sub.add_argument("--model", metavar="MODEL_DIR|BUNDLE", action="append",
                     help="repeat for an ensemble (--model A --model B: decoded together; needs --output)")
    sub.add_argument("--features", nargs="+", metavar="FILE")
    sub.add_argument("--captions", metavar="DIR")
    sub.add_argument("--split", metavar="dev|test")
    sub.add_argument("--beam", metavar="K")
    sub.add_argument("--images", metavar="DIR", help="image folder for thumbnails")
    sub.add_argument("--output", metavar="DIR")
    sub.add_argument("--force", action="store_true", help="rerun even if up to date; replace report files "
                     "that no evaluation wrote")

    sub = commands.add_parser("export", help="model directory -> a bundle that captions without TensorFlow (LiteRT)")
    sub.add_argument("--model", metavar="MODEL_DIR", help="the trained model directory (never written)")
    sub.add_argument("--output", metavar="BUNDLE_DIR", help="the bundle folder (new, or an earlier bundle)")
    sub.add_argument("--force", action="store_true", help="export again even if up to date")

    sub = commands.add_parser("serve", help="HTTP API and web page captioning photos (FastAPI + uvicorn)")
    sub.add_argument("--model", metavar="MODEL_DIR|BUNDLE")
    sub.add_argument("--host", metavar="HOST", help="default 127.0.0.1 (this machine only)")
    sub.add_argument("--port", metavar="PORT", help="default 8000")
    sub.add_argument("--cors-origin", metavar="ORIGIN", help="let pages from ORIGIN call the API; default: CORS off")
    sub.add_argument("--allowed-host", metavar="NAME", action="append",
                     help="a Host name requests may carry (repeat it; * any); default: the bound host, localhost, 127.0.0.1")
    sub.add_argument("--backbone-weights", metavar="FILE",
                     help="the .h5/.tflite file the model's features were made with, when not at its recorded path")

    for sub in commands.choices.values():
        _add_common(sub)

def _add_engine_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--engine", metavar="local|ray", help="local (default): this process; ray: a Ray Data pipeline")
    sub.add_argument("--ray-address", metavar="ADDR", help="a Ray cluster's head (HOST:PORT); default $RAY_ADDRESS, "
                     "else Ray started on this machine")
    sub.add_argument("--image-column", metavar="NAME", help="parquet inputs: the image bytes column (default image)")
    sub.add_argument("--id-column", metavar="NAME", help="parquet inputs: the id column (default id)")


def build_caption_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="caption", description="Caption images with a trained model.")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--model", metavar="MODEL_DIR|BUNDLE", action="append",
                        help="a model directory or a bundle (captioner export); default: models/flickr8k "
                             "(eval.model), else the pretrained bundle; repeat it for an ensemble")
    parser.add_argument("--beam", metavar="K")
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    parser.add_argument("--explain", metavar="OUT_DIR",
                        help="attention models: write a PNG per caption with each word's attention on the photo")
    parser.add_argument("--backbone-weights", metavar="FILE",
                        help="the .h5/.tflite file the model's features were made with, when not at its recorded "
                             "path (a bundle also looks in its folder, $CAPTIONER_BACKBONES and ../shared/backbones)")
    parser.add_argument("--force", action="store_true",
                        help="with --explain: replace files in OUT_DIR that are not attention strips (never a photo "
                        "being captioned)")
    _add_common(parser)
    return parser


def resolve_config(command: str, args: argparse.Namespace, overrides: Sequence[str]) -> config_lib.Config:
    """Defaults, then --config, then the flags, then dotted overrides.

    A repeatable --model (an ensemble) sets eval.model to its first value; `ensemble_members`
    gives them all.
    """
    config = config_lib.load_file(args.config) if args.config else config_lib.Config()
    for flag, key in FLAG_FIELDS.get(command, {}).items():
        value = getattr(args, flag, None)
        if flag == "model" and isinstance(value, list):
            value = value[0]
        if flag in ("images", "captions") and isinstance(value, list):
            value = os.pathsep.join(value)  # several inputs in one string field (captioner.data.sources.split_inputs)
        if value is not None:
            config_lib.set_value(config, key, value)
    return config_lib.validate(config_lib.apply_overrides(config, list(overrides)))


def ensemble_members(args: argparse.Namespace, config: config_lib.Config) -> list[str]:
    """The model directories of a repeatable --model: eval.model (the first), then the other flags' values."""
    values = getattr(args, "model", None)
    extra = values[1:] if isinstance(values, list) else []
    return [config.eval.model, *extra]


def _split_overrides(extra: Sequence[str]) -> list[str]:
    overrides = []
    for item in extra:
        if item.startswith("--") and "." in item.split("=", 1)[0]:
            config_lib.parse_override(item)  # raises a one-line error for --train.epochs 20
            overrides.append(item)
        else:
            raise CaptionerError(f"unrecognized argument: {item}")
    return overrides


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("absl", "tensorflow", "h5py", "PIL", "matplotlib", "ray"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _run(handler: Callable[[], int]) -> int:
    try:
        return handler()
    except CaptionerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno != errno.ENAMETOOLONG:
            raise
        print(f"error: file name too long: {error.filename}", file=sys.stderr)  # a path given by the user
        return 2
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing not in TRAIN_EXTRA_MODULES:
            raise
        print(
            f"error: this needs {missing}, which the base install leaves out (it captions with bundles only): "
            "pip install 'captioner[train]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _interrupted() -> None:
    cache.abandon_outputs()
    print("interrupted", file=sys.stderr)


def _interruptible(work: Callable[[], int]) -> int:
    """`work` under `runtime.run_interruptibly`: Ctrl-C stops at once, exit 130, one line."""
    return runtime.run_interruptibly(work, _interrupted)


def default_model(config: config_lib.Config, given: bool) -> None:
    """With no --model and eval.model at its default, which does not exist, `caption` and `serve` use
    the pretrained bundle (`captioner.layout.default_bundle`) when the package ships one."""
    if given or config.eval.model != config_lib.EvalConfig().model or Path(config.eval.model).exists():
        return
    pretrained = layout.default_bundle()
    if pretrained is not None:
        config.eval.model = str(pretrained)


def _needs_keras(models: Sequence[str | Path]) -> bool:
    """Whether any of the models is a model directory (Keras), not a bundle."""
    return not all(layout.is_bundle(m) for m in models)


def _print_summary(result: Any) -> int:
    summary = getattr(result, "summary", None)
    if callable(summary):
        text = summary()
        if text:
            print(text)
    return int(getattr(result, "exit_code", 0))


def main(argv: Sequence[str] | None = None) -> int:
    """The `captioner` command."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def handler() -> int:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        _setup_logging(args.verbose)
        overrides = _split_overrides(extra)
        config = resolve_config(args.command, args, overrides)
        force = getattr(args, "force", False)
        if args.command == "serve":
            default_model(config, given=args.model is not None)
        tflite_extract = args.command == "extract" and config.features.weights.strip().lower().endswith(".tflite")
        bundles_only = args.command in ("evaluate", "serve") and not _needs_keras(ensemble_members(args, config))
        ray_driver = config.engine.name == "ray" and args.command in ("extract", "caption-batch")  # workers load it
        if args.command in KERAS_COMMANDS and not tflite_extract and not bundles_only and not ray_driver:
            # A .tflite backbone and a bundle run in LiteRT, without TensorFlow.
            runtime.import_keras()  # before the stage imports it: the backend's start-up chatter stays off stderr

        if args.command == "demo-data":

            return _print_summary(make_demo_data(config.demo, config=config, force=force))
        if args.command == "extract":
            if config.engine.name == "ray" or not sources.is_image_folder(config.features.images):
                return _print_summary(extract_engine(config, force=force))
            return _interruptible(lambda: _print_summary(extract_stage(config, force=force)))
        if args.command == "caption-batch":
            return _print_summary(caption_batch(config, force=force))
        if args.command == "quantize":

            return _interruptible(lambda: _print_summary(quantize_config_stage(config, force=force)))
        if args.command == "merge-features":

            return _print_summary(merge_feature_parts([Path(p) for p in args.parts], Path(args.output), force=force))
        if args.command == "prepare":

            return _print_summary(prepare_stage(config, force=force))
        if args.command == "train":

            return _print_summary(train_stage(config, force=force, resume=args.resume))
        if args.command == "finetune":

            return _print_summary(finetune_stage(config, force=force, resume=args.resume))
        if args.command == "evaluate":

            return _print_summary(evaluate_stage(config, force=force, models=ensemble_members(args, config)))
        if args.command == "export":

            return _print_summary(export_stage(config, force=force))
        if args.command == "serve":
            from captioner.serving.serve import serve

            return serve(config, backbone_weights=args.backbone_weights)
        raise CaptionerError(f"unknown command {args.command}")  # argparse already refuses these

    return _run(handler)


def caption_main(argv: Sequence[str] | None = None) -> int:
    """The `caption` command: prints one caption per image (or JSON lines with --json)."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def handler() -> int:
        args, extra = build_caption_parser().parse_known_args(argv)
        _setup_logging(args.verbose, quiet=True)
        config = resolve_config("caption", args, _split_overrides(extra))
        default_model(config, given=args.model is not None)
        models = [Path(m) for m in ensemble_members(args, config)]
        if _needs_keras(models):  # a bundle alone runs on numpy and LiteRT: TensorFlow is never imported
            runtime.import_keras()

        def work() -> int:
            # Each batch's captions are printed as soon as it is done: Ctrl-C keeps what was finished.
            failed = 0
            for outcome in iter_caption_files(
                models if len(models) > 1 else models[0], [Path(p) for p in args.images], config.decode,
                args.backbone_weights,
                explain_dir=Path(args.explain) if args.explain else None,
                force=args.force,
            ):
                if outcome.error is not None:
                    failed += 1
                    print(f"error: {outcome.path}: {outcome.error}", file=sys.stderr, flush=True)
                    if not args.json:
                        continue
                if args.json:
                    print(json.dumps(outcome.to_dict()), flush=True)
                elif len(args.images) == 1:
                    print(outcome.caption, flush=True)
                else:
                    print(f"{outcome.path}\t{outcome.caption}", flush=True)
            return 1 if failed else 0

        return _interruptible(work)

    return _run(handler)


if __name__ == "__main__":
    sys.exit(main())
