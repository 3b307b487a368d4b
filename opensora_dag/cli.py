"""The ``opensora-dag`` command line: ingest videos, materialize assets, query the catalog, run the demo.

Subcommands that belong to a library (``data``, ``conformance``, ``train``, ``sample``, ``app``) hand their remaining
arguments to that library's own ``main(argv)``, so each keeps its flags next to its code.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
from pathlib import Path

# name -> (module with main(argv), help). Imported only when the subcommand runs.
DELEGATED = {
    "data": ("curation.datautil", "datautil on DuckDB/Polars: info, merge, dedupe, stats, filter"),
    "conformance": ("models.conformance", "check an STDiT2 port against golden tensors: conformance DIR [--atol X] [--simulate-other-cpu SEED]"),
    "buckets": ("training.buckets", "bucket report of a training table: buckets DATASET [--preset stage1]"),
    "train": ("training.train", "train STDiT2: train PRESET --dataset VERSION|PATH [--nproc N] [--steps N] ..."),
    "sample": ("training.sample", "sample videos or images from a checkpoint"),
    "app": ("training.app", "Gradio app over a checkpoint (127.0.0.1 by default)"),
}


def _lakehouse(args):
    from resources.lakehouse import Lakehouse

    return Lakehouse(home=args.home) if args.home else Lakehouse()


def cmd_ingest(args) -> int:
    from resources.lakehouse import sanitize_partition_key

    from opensora_dag.instance import get_instance
    from opensora_dag.partitions import video_batches

    source = Path(args.path).expanduser().resolve()
    if not source.is_dir():
        print(f"error: {source} is not a folder of videos", file=sys.stderr)
        return 2
    lake = _lakehouse(args)
    lake.ensure_layout()
    batch = sanitize_partition_key(args.batch or source.name)
    target = lake.batch_dir(batch)
    if target.resolve() != source:
        target.mkdir(parents=True, exist_ok=True)
        for item in sorted(source.rglob("*")):
            if not item.is_file():
                continue
            dest = target / item.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                continue
            if args.link:
                dest.symlink_to(item)
            else:
                shutil.copy2(item, dest)
    instance = get_instance(lake.root)
    if batch not in instance.get_dynamic_partitions(video_batches.name):
        instance.add_dynamic_partitions(video_batches.name, [batch])
    print(f"batch {batch!r} registered: {target}")
    return 0


def cmd_materialize(args) -> int:
    from opensora_dag.instance import get_instance, materialize_selection

    lake = _lakehouse(args)
    lake.ensure_layout()
    instance = get_instance(lake.root)
    batches = [args.batch] if args.batch else None
    try:
        outcomes = materialize_selection(args.select, batches, instance)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for o in outcomes:
        where = f"batch {o.partition_key}" if o.partition_key else "unpartitioned"
        print(f"{'ok    ' if o.success else 'FAILED'} {where}: {', '.join(o.asset_keys)} (run {o.run_id})")
    return 0 if all(o.success for o in outcomes) else 1


def cmd_sql(args) -> int:
    import duckdb
    import polars as pl

    lake = _lakehouse(args)
    try:
        frame = lake.query(args.query)
    except (FileNotFoundError, duckdb.Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with pl.Config(tbl_rows=args.max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
        print(frame)
    return 0


def cmd_demo(args) -> int:
    from opensora_dag.demo import run_demo

    return run_demo(_lakehouse(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opensora-dag", description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="data root (default: $OPENSORA_HOME or ./.opensora)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="copy (or link) a folder of videos into landing/NAME and register the partition")
    p.add_argument("path")
    p.add_argument("--batch", help="partition name (default: the folder's name, sanitised)")
    p.add_argument("--link", action="store_true", help="symlink the files instead of copying them")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("materialize", help="run assets in-process against the project's Dagster instance")
    p.add_argument("--select", default="*", help="Dagster selection, e.g. 'group:curation' or 'raw_videos+' (default: all)")
    p.add_argument("--batch", help="video_batches partition (default: every registered batch)")
    p.set_defaults(func=cmd_materialize)

    p = sub.add_parser("sql", help="read-only SQL over catalog.duckdb")
    p.add_argument("query")
    p.add_argument("--max-rows", type=int, default=50)
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("demo", help="seed landing/sample and run the whole graph on the embedded default")
    p.set_defaults(func=cmd_demo)

    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Delegated subcommands parse their own flags: find the subcommand after the global options.
    for i, token in enumerate(argv):
        if token in DELEGATED:
            module = importlib.import_module(DELEGATED[token][0])
            if i:
                parser.parse_args(argv[:i] + ["sql", "x"])  # validate global options only
                _apply_home(argv[:i])
            return int(module.main(argv[i + 1 :]) or 0)
        if not token.startswith("-") and argv[i - 1 : i] != ["--home"]:
            break
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _apply_home(global_args: list[str]) -> None:
    import os

    if "--home" in global_args:
        os.environ["OPENSORA_HOME"] = global_args[global_args.index("--home") + 1]


if __name__ == "__main__":
    sys.exit(main())
