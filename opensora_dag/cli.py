"""The ``opensora-dag`` command line: one command tree for ingesting, the assets, the lake, data, training and sampling.

Its own subcommands ingest videos, materialize assets, query the catalog and run the demo; the others (data,
conformance, buckets, train, encoder-cache, sample, app) belong to a library: their arguments come from its module
(``add_arguments(parser)``, next to their code) and they run as its ``run(args)``; ``python -m training.train`` and
the like parse the same arguments. ``--home`` is set as ``$OPENSORA_HOME`` before any subcommand runs.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from pathlib import Path

# name -> (what adds its arguments, what runs it, help); both "module:function". The arguments are added when the tree
# is built (those modules import no torch); the module that runs a command is imported only when it runs.
LIBRARY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("curation.datautil_cli:add_arguments", "curation.datautil_cli:run",
             "datautil on DuckDB/Polars: info, merge, dedupe, stats, filter; export VERSION OUT"),
    "conformance": ("models.conformance:add_arguments", "models.conformance:run",
                    "check an STDiT2 port against golden tensors: conformance DIR [--atol X] [--simulate-other-cpu SEED]"),
    "buckets": ("training.bucket_report:add_arguments", "training.bucket_report:run",
                "bucket report of a training table: buckets DATASET [--preset stage1]"),
    "train": ("training.arguments:add_train_arguments", "training.train:run",
              "train STDiT2: train PRESET --dataset VERSION|PATH [--nproc N] [--steps N] ..."),
    "encoder-cache": ("training.arguments:add_encoder_cache_arguments", "training.encoder_cache:run",
                      "precompute T5 embeddings and VAE latents of a run: encoder-cache PRESET --dataset D --out DIR"),
    "sample": ("training.sample:add_arguments", "training.sample:run", "sample videos or images from a checkpoint"),
    "app": ("training.app:add_arguments", "training.app:run", "Gradio app over a checkpoint (127.0.0.1 by default)"),
}


def _function(spec: str):
    """``"module:function"`` -> the function (importing the module)."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _run_library_command(spec: str, args) -> int:
    return _function(spec)(args)


def _lakehouse(args):
    from resources.lakehouse import Lakehouse

    return Lakehouse(home=args.home) if args.home else Lakehouse()


def _refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_ingest(args) -> int:
    return _ingest(args)[0]


def _ingest(args) -> tuple[int, str | None]:
    """Land ``args.path`` and register its batch: (exit code, the batch key; None when refused)."""
    from resources.batch_keys import InvalidBatchKey, key_for_folder, read_landing_map, validate_batch_key

    if args.batch is not None:  # a key given on the command line is a name, never a path: checked before anything
        try:
            validate_batch_key(args.batch)
        except InvalidBatchKey as err:
            return _refuse_ingest(str(err))
    source = Path(args.path).expanduser().resolve()
    if not source.is_dir():
        return _refuse_ingest(f"{source} is not a folder of videos")
    lake = _lakehouse(args)
    storage = lake.storage
    if storage.remote and args.link:
        return _refuse_ingest(f"--link needs a local data path; landing/ is on {storage.root}: the files are uploaded instead")
    landing = None if storage.remote else lake.landing_dir.resolve()
    if landing is not None and (source == landing or source in landing.parents):
        return _refuse_ingest(f"{source} holds the landing folder {landing}; ingest one of its sub-folders instead")
    mapping = read_landing_map(lake)
    try:
        if args.batch is not None:
            # An existing batch keeps its folder; a new one gets landing/<key>/.
            batch, folder = args.batch, mapping.get(args.batch, args.batch)
            owner = key_for_folder(folder, mapping)
            if owner != batch:
                return _refuse_ingest(f"landing folder {folder!r} is already batch {owner!r}; use --batch {owner}")
        else:  # landing/<folder name>/ (the source itself when it is already there), mapped as the sensor maps it
            folder = source.name
            batch = key_for_folder(folder, mapping)
    except InvalidBatchKey as err:
        return _refuse_ingest(str(err))
    lake.ensure_layout()
    if storage.remote:  # upload into landing/<folder>/ on the object store (files already there are kept)
        target = storage.url("landing", folder)
        for item in sorted(source.rglob("*")):
            rel = item.relative_to(source).as_posix()
            if item.is_file() and not storage.exists(storage.url("landing", folder, rel)):
                storage.put_file(item, "landing", folder, rel)
        return _register_ingested(lake, folder, batch, target), batch
    target = landing / folder
    if target.resolve().parent != landing:
        return _refuse_ingest(f"landing folder {target} resolves outside {landing}; refusing to write there")
    if target.resolve() != source:
        from curation.ingest import land_files

        # Temporary name + rename per file: an interrupted ingest leaves no truncated file under a real name, and
        # a re-run replaces any copy whose size or bytes differ from the source; links are recorded as ingest's.
        landed = land_files(source, target, link=args.link)
        if landed.replaced:
            print(f"replaced {len(landed.replaced)} file(s) that differed from the source")
    return _register_ingested(lake, folder, batch, target), batch


def _refuse_ingest(message: str) -> tuple[int, None]:
    return _refuse(message), None


def _register_ingested(lake, folder: str, batch: str, target) -> int:
    from resources.batch_keys import register_landing_folder

    from assets.partitions import video_batches
    from opensora_dag.instance import get_instance

    registered = register_landing_folder(lake, folder)
    if registered != batch:  # another registration won the race for this folder
        return _refuse(f"landing folder {folder!r} was registered as batch {registered!r} meanwhile")
    instance = get_instance(lake.root)
    if batch not in instance.get_dynamic_partitions(video_batches.name):
        instance.add_dynamic_partitions(video_batches.name, [batch])
    print(f"batch {batch!r} registered: {target}")
    return 0


def _start_curation_workers() -> None:
    """The curation pool's forkserver imports PyAV and OpenCV on the other core while this process imports Dagster."""
    from curation.batch_tasks import PRELOAD
    from curation.pool import start_forkserver

    start_forkserver(PRELOAD)


def cmd_materialize(args) -> int:
    from resources.batch_keys import InvalidBatchKey, validate_batch_key

    from opensora_dag.instance import get_instance, materialize_selection

    if args.batch is not None:  # checked before the instance, the lake or any asset is touched
        try:
            validate_batch_key(args.batch)
        except InvalidBatchKey as err:
            return _refuse(str(err))
    try:
        asset_config = parse_settings(args.settings)
    except ValueError as err:
        return _refuse(str(err))
    lake = _lakehouse(args)
    lake.ensure_layout()
    instance = get_instance(lake.root)
    batches = [args.batch] if args.batch else None
    try:
        outcomes = materialize_selection(args.select, batches, instance, asset_config=asset_config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for o in outcomes:
        where = f"batch {o.partition_key}" if o.partition_key else "unpartitioned"
        print(f"{'ok    ' if o.success else 'FAILED'} {where}: {', '.join(o.asset_keys)} (run {o.run_id})")
    return 0 if all(o.success for o in outcomes) else 1


CURATE_SELECTION = "key:raw_videos or key:scenes or key:clips"
"""What ``curate`` materializes by default: probed frozen sources, shots, and training-ready (virtual) clips."""


def cmd_curate(args) -> int:
    """``ingest`` then ``materialize`` of the new batch, in one process: the imports, the Dagster instance and the
    lake are set up once, not twice (about 2-3 s of start-up on a small machine)."""
    try:
        parse_settings(args.settings)  # a bad --set is refused before anything lands
    except ValueError as err:
        return _refuse(str(err))
    _start_curation_workers()
    code, batch = _ingest(args)
    if code:
        return code
    args.batch = batch
    return cmd_materialize(args)


def parse_settings(settings: list[str]) -> dict[str, dict]:
    """``["clips.encode_files=true", "scenes.workers=2"]`` -> ``{"clips": {"encode_files": True}, "scenes": ...}``.
    Dagster validates the fields and values against each asset's Config before anything runs."""
    import json
    import re

    config: dict[str, dict] = {}
    for item in settings:
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)=(.*)", item, flags=re.S)
        if not match:
            raise ValueError(f"--set {item!r}: expected ASSET.FIELD=VALUE, e.g. clips.encode_files=true")
        asset, field, raw = match.groups()
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        config.setdefault(asset, {})[field] = value
    return config


def print_frame(frame, fmt: str, max_rows: int) -> None:
    """table (at most max_rows shown), csv (one header line, every row) or json (one array of objects)."""
    import polars as pl

    if fmt == "csv":
        sys.stdout.write(frame.write_csv())
    elif fmt == "json":
        sys.stdout.write(frame.write_json() + "\n")
    else:
        with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
            print(frame)


def cmd_sql(args) -> int:
    import duckdb

    from resources.lakehouse import LakeError, QueryRefused

    lake = _lakehouse(args)
    try:
        frame = lake.query(args.query, snapshot=args.snapshot)
    except QueryRefused as err:
        print(f"refused: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, LakeError, duckdb.Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_frame(frame, args.format, args.max_rows)
    return 0


def cmd_lake(args) -> int:
    from resources import lake_maintenance as maintenance
    from resources.lakehouse import LakeError

    lake = _lakehouse(args)
    try:
        if args.lake_command == "snapshots":
            print_frame(lake.snapshots(), args.format, args.max_rows)
        elif args.lake_command == "gc":
            report = maintenance.gc(lake, maintenance.parse_duration(args.older_than), dry_run=args.dry_run)
            print(report.summary())
        elif args.lake_command == "retire":
            maintenance.retire(lake, args.version)
            print(f"dataset version {args.version} retired: the next gc may expire the snapshot it pinned")
        elif args.lake_command == "import":
            report = maintenance.import_legacy(lake, Path(args.old_home))
            print(report.summary())
    except (LakeError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def add_data_export(data_ops) -> None:
    """``data export``: added to the ops of ``data`` (the table tools in ``curation.datautil``); it needs the lake."""
    p = data_ops.add_parser("export", help="a dataset version's clips as H.264 files plus OUT/opensora.csv",
                            description=cmd_data_export.__doc__)
    p.add_argument("version", help="a dataset version name (as `opensora-dag lake snapshots` / the asset show it) or 'latest'")
    p.add_argument("out", type=Path, help="folder to write opensora.csv and clips/ into (created)")
    p.add_argument("--workers", type=int, default=None, help="encoder processes (default: one per core)")
    p.add_argument("--short-side", type=int, default=720, help="shorter side cap, never upscaled (default 720)")
    p.add_argument("--crf", type=int, default=18)
    p.add_argument("--preset", default="veryfast")
    p.set_defaults(func=cmd_data_export)


def cmd_data_export(args) -> int:
    """``opensora-dag data export VERSION OUT``: a dataset version's clips as H.264 files plus ``OUT/opensora.csv``."""
    import re

    if args.version != "latest" and not re.fullmatch(r"[0-9a-f]{6,64}", args.version):
        return _refuse(f"{args.version!r} is not a dataset version name (lowercase hex) or 'latest'")
    if args.workers is not None and args.workers < 1:
        return _refuse("--workers must be 1 or more")

    import polars as pl

    from common.storage import local_dataset_version
    from curation.datasets import latest_published_version
    from curation.export import ExportJob, export_dataset
    from resources.lakehouse import Lakehouse

    lake = Lakehouse()  # $OPENSORA_HOME (set from --home), $OPENSORA_CATALOG, $OPENSORA_DATA_PATH
    if args.version == "latest":
        found = latest_published_version(lake.storage)
        if found is None:
            return _refuse("the lake has no dataset version yet: materialize curated_dataset first")
        folder = Path(found.path)
    else:
        folder = local_dataset_version(lake, args.version)
    data = folder / "data.parquet"
    if not data.is_file():
        return _refuse(f"no dataset version {args.version!r} in the lake ({folder} has no data.parquet)")
    storage = lake.storage
    if storage.remote:
        import tempfile

        (lake.root / "scratch").mkdir(parents=True, exist_ok=True)
        clip_dir = tempfile.mkdtemp(prefix="export-", dir=lake.root / "scratch")
    else:
        clip_dir = str(lake.media_dir / "clips")
    job = ExportJob(clip_dir=clip_dir, short_side=args.short_side, crf=args.crf, preset=args.preset)
    try:
        result = export_dataset(pl.read_parquet(data), args.out, job, storage=storage, workers=args.workers,
                                progress=lambda done, total, source: print(f"export: {done}/{total} {source}", flush=True))
    finally:
        if storage.remote:
            import shutil

            shutil.rmtree(clip_dir, ignore_errors=True)
    for clip_id, reason in result.failed:
        print(f"export: {clip_id} not exported: {reason}", file=sys.stderr)
    print(f"exported {result.clips} clip(s) ({result.encoded} encoded, {result.clips - result.encoded} reused) -> {result.csv}")
    return 1 if result.failed else 0


def cmd_demo(args) -> int:
    from opensora_dag.demo import run_demo

    return run_demo(_lakehouse(args))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command tree; with ``command``, a library command's arguments are added only when it is that one
    (adding them imports its module: a few hundred ms that ``ingest`` or ``curate`` need not pay)."""
    parser = argparse.ArgumentParser(prog="opensora-dag", description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="data root (default: $OPENSORA_HOME or ./.opensora)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="copy (or link) a folder of videos into landing/NAME and register the partition")
    p.add_argument("path")
    p.add_argument("--batch", help="batch key: letters, digits, _ . - (default: derived from the folder's name, as the landing sensor does)")
    p.add_argument("--link", action="store_true", help="symlink the files instead of copying them")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("materialize", help="run assets in-process against the project's Dagster instance")
    p.add_argument("--select", default="*", help="Dagster selection, e.g. 'group:curation' or 'raw_videos+' (default: all)")
    p.add_argument("--batch", help="video_batches partition key (default: every registered batch)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="ASSET.FIELD=VALUE",
                   help="run config of one asset, e.g. clips.encode_files=true or scenes.workers=1 (repeatable; "
                   "VALUE is read as JSON, else as a string)")
    p.set_defaults(func=cmd_materialize)

    p = sub.add_parser("curate", help="ingest a folder and materialize its batch up to training-ready clips, in one process")
    p.add_argument("path")
    p.add_argument("--batch", help="batch key (default: derived from the folder's name, as ingest does)")
    p.add_argument("--link", action="store_true", help="symlink the files instead of copying them")
    p.add_argument("--select", default=CURATE_SELECTION, help=f"Dagster selection (default: {CURATE_SELECTION!r})")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="ASSET.FIELD=VALUE",
                   help="run config of one asset, as materialize --set (repeatable)")
    p.set_defaults(func=cmd_curate)

    formats = argparse.ArgumentParser(add_help=False)
    formats.add_argument("--format", choices=("table", "csv", "json"), default="table")
    formats.add_argument("--max-rows", type=int, default=50, help="rows shown by --format table (csv/json: all)")

    p = sub.add_parser("sql", parents=[formats], help="one read-only SELECT over the lake (tables by asset name)")
    p.add_argument("query")
    p.add_argument("--snapshot", type=int, help="read the lake as of this snapshot (see: lake snapshots)")
    p.set_defaults(func=cmd_sql)

    lake = sub.add_parser("lake", help="lake maintenance: snapshots, gc, retire, import")
    lake_sub = lake.add_subparsers(dest="lake_command", required=True)
    lake_sub.add_parser("snapshots", parents=[formats], help="snapshot_id,time,table,batch,run_id of every write")
    p = lake_sub.add_parser("gc", help="expire old snapshots and delete files and media no snapshot references")
    p.add_argument("--older-than", required=True, help="age such as 7d, 12h, 30m, 0s")
    p.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    p = lake_sub.add_parser("retire", help="give up a dataset version (gc may then expire its pinned snapshot)")
    p.add_argument("version")
    p = lake_sub.add_parser("import", help="copy (never move) a lake written by the previous layout into the catalog")
    p.add_argument("old_home")
    lake.set_defaults(func=cmd_lake)

    p = sub.add_parser("demo", help="seed landing/sample and run the whole graph on the embedded default")
    p.set_defaults(func=cmd_demo)

    for name, (add_arguments, run, help_text) in LIBRARY_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is not None and name != command:
            continue  # listed in the help, arguments not needed
        added = _function(add_arguments)(p)
        p.set_defaults(func=functools.partial(_run_library_command, run))
        if name == "data":  # the table tools' ops, plus export (its own func, which needs the lake)
            add_data_export(added)
    return parser


def named_command(argv: list[str]) -> str:
    """The subcommand word of a command line ("" when there is none yet, e.g. ``--help``)."""
    words = iter(argv)
    for word in words:
        if word == "--home":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(named_command(argv)).parse_args(argv)
    if args.home:  # one home for everything this process opens: the lake, the Dagster instance, MLflow, scratch
        import os

        os.environ["OPENSORA_HOME"] = args.home
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
