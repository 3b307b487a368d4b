"""The curated dataset: every batch's clips joined with scores and captions, filtered, frozen as a version."""

import json

from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.curation import captions, clips, markdown_table
from assets.scoring import SCORE_ASSETS
from resources.lakehouse import Lakehouse

INPUT_TABLES = ("clips", "aesthetic_scores", "motion_scores", "ocr_scores", "captions", "match_scores")


class CuratedDatasetConfig(Config):
    """The filter spec (``curation.datasets.FilterSpec``); unset bounds are not applied."""

    preset: str | None = Field(None, description="A named spec (all, reference, train) used as the base.")
    min_frames: int | None = None
    max_frames: int | None = None
    min_resolution: int | None = None
    max_resolution: int | None = None
    fpsmin: float | None = None
    fpsmax: float | None = None
    aesmin: float | None = None
    flowmin: float | None = None
    flowmax: float | None = None
    ocrmax: float | None = None
    matchmin: float | None = None
    dedupe: bool = True
    require_caption: bool = True

    def spec(self):
        from curation.datasets import PRESETS, FilterSpec

        base = PRESETS[self.preset].model_dump() if self.preset else {}
        fields = {k: v for k, v in self.model_dump().items() if k != "preset" and (v is not None or k not in base)}
        return FilterSpec(**{**base, **fields})


@asset(
    deps=[clips, captions, *SCORE_ASSETS],
    group_name="curation",
    code_version="1",
    kinds={"duckdb", "parquet"},
    description="An immutable dataset version (lake/datasets/<version>/) of all batches that pass the filter spec, "
    "plus an Open-Sora-compatible CSV.",
)
def curated_dataset(context: AssetExecutionContext, config: CuratedDatasetConfig, lakehouse: Lakehouse) -> MaterializeResult:
    from curation.datasets import build_dataset, histograms

    spec = config.spec()
    read = lakehouse.read_at_one_snapshot(list(INPUT_TABLES))  # what was read and what names it: one snapshot
    built = build_dataset(read.frames, spec, read.versions, lakehouse.lake_dir / "datasets", lake_snapshot=read.snapshot)
    snapshot = record_dataset_version(lakehouse, built, run_id=context.run.run_id)

    import polars as pl

    data = pl.read_parquet(built.data_path)
    hist = histograms(data, ["aes", "flow", "ocr", "match", "num_frames"])
    context.log.info(f"dataset {built.version}: kept {built.num_rows} of {built.num_clips} clips ({'reused' if built.reused else 'built'})")
    for skipped in built.skipped:
        context.log.warning(f"criterion {skipped.criterion} skipped: {skipped.reason}")
    return MaterializeResult(
        data_version=DataVersion(built.version),
        metadata={
            "version": built.version,
            "lake_snapshot": snapshot,
            "pinned_snapshot": built.lake_snapshot,
            "num_rows": built.num_rows,
            "num_clips": built.num_clips,
            "path": MetadataValue.path(str(built.path)),
            "opensora_csv": MetadataValue.path(str(built.csv_path)),
            "drop_counts": MetadataValue.json(built.drop_counts),
            "skipped_criteria": MetadataValue.json([s.model_dump() for s in built.skipped]),
            "spec": MetadataValue.json(json.loads(spec.canonical_json())),
            "histograms": MetadataValue.md(histogram_markdown(hist)),
            "bucket_coverage": MetadataValue.md(bucket_coverage(data)),
            "preview": markdown_table(data.select([c for c in ("path", "text", "num_frames", "aes", "flow", "ocr", "match") if c in data.columns])),
        },
    )


def record_dataset_version(lakehouse: Lakehouse, built, run_id: str | None = None) -> int:
    """Record the version in the lake (``dataset_versions``: what it pins, for gc) and point the
    ``curated_dataset`` view at it; returns the snapshot."""
    import polars as pl

    from resources.lakehouse import sql_string

    row = pl.DataFrame([{"version": built.version, "lake_snapshot": built.lake_snapshot, "path": str(built.path),
                         "num_rows": built.num_rows, "created_at": built.created_at, "retired": False}],
                       schema_overrides={"lake_snapshot": pl.Int64})
    snapshot = lakehouse.write_partition("dataset_versions", None, row, key={"version": built.version}, run_id=run_id)
    lakehouse.refresh_catalog(extra_views={"curated_dataset": f"SELECT * FROM read_parquet({sql_string(built.data_path)})"})
    return snapshot


def histogram_markdown(hist: dict) -> str:
    if not hist:
        return "_(no scores)_"
    lines = []
    for column, h in hist.items():
        counts = h.get("counts", [])
        edges = h.get("edges", [])
        peak = max(counts) if counts else 1
        lines.append(f"**{column}**\n```")
        for k, count in enumerate(counts):
            lo = edges[k] if k < len(edges) else float("nan")
            lines.append(f"{lo:>9.3g} | {'#' * int(round(30 * count / peak)) if peak else ''} {count}")
        lines.append("```")
    return "\n".join(lines)


def bucket_coverage(data) -> str:
    """How the dataset's clips fall into the stage-1 training buckets (so "0 samples" is never a surprise)."""
    if not len(data):
        return "_(empty dataset)_"
    from training.buckets import Bucket, bucket_report, load_bucket_preset

    lines = []
    for name in ("demo_cpu", "stage1"):
        preset = load_bucket_preset(name)
        report = bucket_report(data, Bucket(preset.bucket_config), preset.frame_interval, preset.seed)
        lines.append(f"### buckets `{name}`: {report.num_kept} kept, {report.num_dropped} dropped\n")
        lines.append(report.to_markdown())
    return "\n".join(lines)
