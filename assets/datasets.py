"""The curated dataset: every batch's clips joined with scores and captions, filtered, frozen as a version."""

import json

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from assets.curation import captions, clips, markdown_table
from assets.scoring import SCORE_ASSETS
from curation.filters import CRITERIA
from resources.lakehouse import Lakehouse

INPUT_TABLES = ("clips", "aesthetic_scores", "motion_scores", "ocr_scores", "captions", "match_scores")


class CuratedDatasetConfig(Config):
    """The filter spec (``curation.filters.FilterSpec``); unset bounds are not applied, a clip without a value fails
    a set one, and only ``skip`` turns a set bound off (each skip shows as a failed check on the asset)."""

    preset: str | None = Field(None, description="A named spec (all, reference, train, demo) used as the base.")
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
    skip: list[str] | None = Field(
        None, description="Criteria set but not applied (names or CLI flags, e.g. aesmin when there are no CLIP "
        "weights); default: the preset's. Each shows as a failed, non-blocking check.",
    )
    dedupe: bool = True
    require_caption: bool = True

    def spec(self):
        from curation.filters import PRESETS, FilterSpec

        base = PRESETS[self.preset].model_dump() if self.preset else {}
        fields = {k: v for k, v in self.model_dump().items() if k != "preset" and (v is not None or k not in base)}
        return FilterSpec(**{**base, **fields})


def criterion_check_name(criterion: str) -> str:
    return f"{criterion}_applied"


# One non-blocking check per filter criterion: passes when the criterion is applied (or not set), fails with the
# reason when the spec skips it (WARN) or when no clip has the value it needs, so it drops every clip (ERROR).
CRITERION_CHECKS = [
    AssetCheckSpec(
        criterion_check_name(c.name), asset="curated_dataset", blocking=False,
        description=f"{c.name} ({c.column} {c.op} bound): applied when set. Fails (warning) when the spec skips "
        f"it, (error) when no clip has a {c.column} value, so every clip fails it.",
    )
    for c in CRITERIA
]


def criterion_check_results(built) -> list[AssetCheckResult]:
    """The result of each criterion check from the version's criteria report."""
    reports = {r.criterion: r for r in built.criteria}
    results = []
    for c in CRITERIA:
        name = criterion_check_name(c.name)
        report = reports.get(c.name)
        if report is None or report.status == "unset":
            results.append(AssetCheckResult(check_name=name, passed=True, metadata={"status": "not set in the spec"}))
            continue
        metadata = {"status": report.status, "bound": report.bound or "", "clips_with_value": report.with_value}
        if report.status == "skipped":
            results.append(AssetCheckResult(check_name=name, passed=False, severity=AssetCheckSeverity.WARN,
                                            metadata={**metadata, "reason": report.reason or "skipped by the spec"}))
            continue
        metadata |= {"dropped": report.dropped, "dropped_without_value": report.dropped_without_value}
        if report.reason:  # applied, but no clip has the value: every clip fails it
            results.append(AssetCheckResult(check_name=name, passed=False, severity=AssetCheckSeverity.ERROR,
                                            metadata={**metadata, "reason": report.reason}))
        else:
            results.append(AssetCheckResult(check_name=name, passed=True, metadata=metadata))
    return results


@asset(
    deps=[clips, captions, *SCORE_ASSETS],
    group_name="curation",
    code_version="1",
    kinds={"duckdb", "parquet"},
    check_specs=CRITERION_CHECKS,
    description="An immutable dataset version (lake/datasets/<version>/) of all batches that pass the filter spec, "
    "plus an Open-Sora-compatible CSV.",
)
def curated_dataset(context: AssetExecutionContext, config: CuratedDatasetConfig, lakehouse: Lakehouse) -> MaterializeResult:
    from curation.datasets import build_dataset, histograms
    from training.bucket_report import bucket_coverage

    spec = config.spec()
    read = lakehouse.read_at_one_snapshot(list(INPUT_TABLES))  # what was read and what names it: one snapshot
    if lakehouse.storage.remote:  # built in a local folder, then published under lake/datasets/<version>/
        built, location = build_and_publish(lakehouse, read, spec)
    else:
        built = build_dataset(read.frames, spec, read.versions, lakehouse.datasets_root, lake_snapshot=read.snapshot)
        location = str(built.path)
    snapshot = record_dataset_version(lakehouse, built, run_id=context.run.run_id, location=location)

    import polars as pl

    data = pl.read_parquet(built.data_path)
    hist = histograms(data, ["aes", "flow", "ocr", "match", "num_frames"])
    context.log.info(f"dataset {built.version}: kept {built.num_rows} of {built.num_clips} clips ({'reused' if built.reused else 'built'})")
    for skipped in built.skipped:
        context.log.warning(f"criterion {skipped.criterion} skipped: {skipped.reason}")
    for report in built.criteria:
        if report.status == "applied" and report.reason:
            context.log.error(f"criterion {report.criterion}: {report.reason}")
    return MaterializeResult(
        data_version=DataVersion(built.version),
        check_results=criterion_check_results(built),
        metadata={
            "version": built.version,
            "lake_snapshot": snapshot,
            "pinned_snapshot": built.lake_snapshot,
            "num_rows": built.num_rows,
            "num_clips": built.num_clips,
            "path": MetadataValue.path(location),
            "opensora_csv": MetadataValue.path(f"{location}/opensora.csv"),
            "drop_counts": MetadataValue.json(built.drop_counts),
            "skipped_criteria": MetadataValue.json([s.model_dump() for s in built.skipped]),
            "spec": MetadataValue.json(json.loads(spec.canonical_json())),
            "histograms": MetadataValue.md(histogram_markdown(hist)),
            "bucket_coverage": MetadataValue.md(bucket_coverage(data)),
            "preview": markdown_table(data.select([c for c in ("path", "text", "num_frames", "aes", "flow", "ocr", "match") if c in data.columns])),
        },
    )


def build_and_publish(lakehouse: Lakehouse, read, spec):
    """The dataset version for an object-store data path: reused when ``lake/datasets/<version>/`` is already
    published (read from its cached copy), else built in a local folder under ``$OPENSORA_HOME/scratch`` and
    published with its manifest last. Returns (the version, its URL)."""
    import shutil
    import tempfile

    from common.storage import DATASETS, local_dataset_version
    from curation.datasets import build_dataset, dataset_version, load_version

    storage = lakehouse.storage
    version = dataset_version(spec, read.versions)
    url = storage.url(*DATASETS, version)
    if storage.exists(f"{url}/manifest.json"):
        folder = local_dataset_version(lakehouse, version)
        return load_version(folder.parent, version).model_copy(update={"reused": True}), url
    (lakehouse.root / "scratch").mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix="dataset-", dir=lakehouse.root / "scratch")
    try:
        built = build_dataset(read.frames, spec, read.versions, staging, lake_snapshot=read.snapshot)
        if not storage.exists(f"{url}/manifest.json"):  # another machine may have published it meanwhile
            storage.put_dir(built.path, *DATASETS, version, last="manifest.json")
        folder = local_dataset_version(lakehouse, version)
        return load_version(folder.parent, version).model_copy(update={"reused": built.reused}), url
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def record_dataset_version(lakehouse: Lakehouse, built, run_id: str | None = None, location: str | None = None) -> int:
    """Record the version in the lake (``dataset_versions``: what it pins, for gc) and point the
    ``curated_dataset`` view at it; returns the snapshot. ``location``: where the version folder is published
    (default: the folder it was built in)."""
    import polars as pl

    from resources.lakehouse import sql_string

    location = location or str(built.path)
    row = pl.DataFrame([{"version": built.version, "lake_snapshot": built.lake_snapshot, "path": location,
                         "num_rows": built.num_rows, "created_at": built.created_at, "retired": False}],
                       schema_overrides={"lake_snapshot": pl.Int64})
    snapshot = lakehouse.write_partition("dataset_versions", None, row, key={"version": built.version}, run_id=run_id)
    lakehouse.refresh_catalog(extra_views={"curated_dataset": f"SELECT * FROM read_parquet({sql_string(location + '/data.parquet')})"})
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
