"""The arguments of ``train`` and ``encoder-cache``, apart from the commands themselves.

``training.train`` and ``training.encoder_cache`` import torch when loaded; the ``opensora-dag`` command tree (and its
``--help``) is built without torch, so their arguments live here. Each command runs as ``run(args)`` of its module,
and ``python -m training.train`` / ``python -m training.encoder_cache`` parse these same arguments.
"""

from __future__ import annotations

import argparse

from training.config import TRAIN_PRESETS, add_override_argument

TRAIN_DESCRIPTION = "Train STDiT2 on a dataset version."
ENCODER_CACHE_DESCRIPTION = "Precompute T5 embeddings and VAE latents of a training run."


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """PRESET, ``--dataset`` and ``--set``: which run, on which data (shared by ``train`` and ``encoder-cache``)."""
    parser.add_argument("preset", help=f"training preset ({', '.join(TRAIN_PRESETS)}) or a YAML path")
    parser.add_argument("--dataset", required=True, help="dataset version id (lake/datasets/<id>) or a .parquet/.csv path")
    add_override_argument(parser)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--nproc", type=int, help="processes on this machine (runs torchrun for you)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--ckpt-every", type=int)
    parser.add_argument("--outdir", help="folder of this config's runs; each run gets its own run-NNN inside "
                        "(default: $OPENSORA_HOME/checkpoints/<name>)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="RUN",
                        help="continue the newest run under --outdir, or RUN (run-003, 3 or a path), from its newest "
                        "complete checkpoint; 'auto': the newest run if unfinished and idle, else a new run. Without "
                        "--resume every call starts a new run")
    parser.add_argument("--objective", choices=["iddpm", "rflow"])
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the embedded store)")
    parser.add_argument("--config-json", help="the whole TrainConfig, validated and serialised by the caller (the "
                        "training asset), used as it is instead of PRESET and its overrides")


# The options of add_train_arguments that take one value, as train_worker_argv hands them on (all but --nproc).
_TRAIN_VALUE_OPTIONS = ("steps", "ckpt_every", "outdir", "resume", "objective", "tracking_uri", "config_json")


def train_worker_argv(args: argparse.Namespace) -> list[str]:
    """Parsed ``train`` arguments back as the command line of one torchrun worker: the same run, without ``--nproc``."""
    argv = [args.preset, f"--dataset={args.dataset}"]
    argv += [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in _TRAIN_VALUE_OPTIONS
             if getattr(args, name) is not None]
    return argv + [f"--set={item}" for item in args.overrides]


def add_encoder_cache_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--out", required=True, help="cache folder (gets train/ and val/)")
    parser.add_argument("--epochs", type=int, help="epochs to cache (default: what the preset's steps need)")
    parser.add_argument("--nproc", type=int, default=1, help="ranks the training run will use (epochs depend on it)")
    parser.add_argument("--posterior", choices=["sample", "mode"], default="sample", help="train/ latents (see the module doc)")
    parser.add_argument("--overwrite", action="store_true")
