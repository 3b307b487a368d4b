"""Score assets, one per scorer so they run, fail and backfill independently.

Each reads the frames the cutting pass kept for it (never the video again) and writes a table keyed by the clip
``id`` with its Open-Sora column (``aes``, ``flow``, ``ocr``, ``match``) and a ``reason`` column. A scorer whose
weights are not on local disk writes nulls with the reason (never numbers from random weights); the dataset
filter then fails that criterion for every clip unless its spec skips it.

A clip whose frames cannot be read is quarantined (input rejected). An exception from the scorer itself is a
component error: quarantined with its reason while rare, and the asset fails with a summary when more than
``max_component_error_share`` of the clips raise one (``ScoringConfig``, ``$OPENSORA_MAX_COMPONENT_ERROR_SHARE``).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from dagster import AssetExecutionContext, MaterializeResult

from assets.curation import IsolationConfig, captions, clips, markdown_table, quarantine_rows, run_isolated, save_batch
from assets.partitions import batch_asset
from resources.batch_keys import batch_key
from resources.lakehouse import Lakehouse
from resources.model_store import ModelStore
from common.storage import local_media_path


def score_table(ids: list[str], column: str, values: dict[str, object], reasons: dict[str, str], dtype) -> pl.DataFrame:
    return pl.DataFrame(
        {"id": ids, column: [values.get(i) for i in ids], "reason": [reasons.get(i) for i in ids]},
        schema={"id": pl.String, column: dtype, "reason": pl.String},
    )


def summary(frame: pl.DataFrame, column: str) -> dict:
    values = frame[column].drop_nulls()
    meta = {"num_clips": len(frame), "num_scored": len(values)}
    if len(values):
        meta.update({f"{column}_mean": float(values.mean()), f"{column}_min": float(values.min()), f"{column}_max": float(values.max())})
    reasons = frame["reason"].drop_nulls().unique().to_list()
    if reasons:
        meta["null_reasons"] = "; ".join(sorted(reasons))[:2000]
    return meta


class ScoringConfig(IsolationConfig):
    """Run config of a score asset (``max_component_error_share``: see ``assets.curation.run_isolated``)."""


def scored(context, stage: str, rows: list[dict], work, config: ScoringConfig | None = None) -> tuple[dict, list[dict], dict]:
    """Score clip rows in isolation: values by id, quarantine records, and the failure reason by id.

    Fails the asset (``dagster.Failure``) when component errors exceed the configured share of ``rows``."""
    share = config.max_component_error_share if config is not None else None
    done, failed = run_isolated(context, stage, rows, work, lambda r: r["path"], max_error_share=share)
    values = {r["id"]: v for r, v in done}
    reasons = {r["id"]: reason for r, reason in failed}
    return values, quarantine_rows(stage, failed, lambda r: r["path"]), reasons


def kept(row: dict, scorer: str):
    """The frames the cutting pass kept for ``scorer`` of the clip in ``row``."""
    from curation.kept_frames import load_kept_frames

    return load_kept_frames(local_media_path(row["frames_dir"]), scorer)


@dataclass(frozen=True)
class ScoreTable:
    """The table a score asset writes: its name, its Open-Sora column, and further columns (name: dtype)."""

    name: str
    column: str
    dtype: pl.DataType = pl.Float64
    extra: dict[str, pl.DataType] = field(default_factory=dict)


def score_partition(
    context,
    config: ScoringConfig,
    lakehouse: Lakehouse,
    table: ScoreTable,
    rows: list[dict],
    load_scorer: Callable[[], Any],
    score_row: Callable[[Any, dict], Any],
    unscorable: Callable[[dict], str | None] = lambda row: None,
    columns: Callable[[dict[str, Any]], dict[str, dict[str, Any]]] | None = None,
) -> MaterializeResult:
    """Load a scorer, score the clip ``rows`` in isolation and save ``table`` (see the module docstring).

    ``score_row(scorer, row)`` gives one clip's value; a row for which ``unscorable(row)`` gives a reason is not
    scored and keeps that reason. ``columns(values)`` turns the values (by clip id) into the table's columns (by
    name, each by clip id) when a value is more than the column's number. When ``load_scorer`` raises
    ``WeightsUnavailable`` every value is null with the error as its reason.
    """
    from models.scorers import WeightsUnavailable

    ids = [r["id"] for r in rows]
    try:
        scorer = load_scorer()
    except WeightsUnavailable as err:
        context.log.warning(f"{table.name} skipped: {err}")
        values, quarantined, reasons = {}, [], {i: str(err) for i in ids}
    else:
        skipped = {r["id"]: reason for r in rows if (reason := unscorable(r))}
        todo = [r for r in rows if r["id"] not in skipped]
        values, quarantined, reasons = scored(context, table.name, todo, lambda r: score_row(scorer, r), config)
        reasons.update(skipped)
    by_column = columns(values) if columns is not None else {table.column: values}
    frame = score_table(ids, table.column, by_column[table.column], reasons, table.dtype)
    frame = frame.with_columns(pl.Series(name, [by_column[name].get(i) for i in ids], dtype=dtype)
                               for name, dtype in table.extra.items())
    written = save_batch(context, lakehouse, table.name, batch_key(context.partition_key), frame, table.name, quarantined)
    return MaterializeResult(metadata={**written, **summary(frame, table.column), "preview": markdown_table(frame)})


@batch_asset(deps=[clips], kinds={"opencv", "parquet"})
def motion_scores(context: AssetExecutionContext, config: ScoringConfig, lakehouse: Lakehouse, model_store: ModelStore) -> MaterializeResult:
    """`flow`: mean optical-flow magnitude over frames 0/10/20/30 at 320x576 (OpenCV, no weights)."""
    from models.scorers.motion import motion_score

    rows = lakehouse.read_partition("clips", batch_key(context.partition_key)).to_dicts()
    return score_partition(context, config, lakehouse, ScoreTable("motion_scores", "flow"), rows, lambda: None,
                           lambda _, r: motion_score(kept(r, "flow"), backend=model_store.flow_backend))


def ocr_columns(values: dict) -> dict[str, dict]:
    """``ocr`` (box count), ``ocr_area`` and ``ocr_text`` from each clip's OCR result."""
    return {"ocr": {i: v.num_boxes for i, v in values.items()},
            "ocr_area": {i: v.area_fraction for i, v in values.items()},
            "ocr_text": {i: " | ".join(v.texts) for i, v in values.items()}}


@batch_asset(deps=[clips], kinds={"onnx", "parquet"})
def ocr_scores(context: AssetExecutionContext, config: ScoringConfig, lakehouse: Lakehouse, model_store: ModelStore) -> MaterializeResult:
    """`ocr`: text boxes with score > 0.3 on one frame (PP-OCR via rapidocr), plus text area fraction."""
    from models.scorers.ocr import OcrScorer

    rows = lakehouse.read_partition("clips", batch_key(context.partition_key)).to_dicts()
    table = ScoreTable("ocr_scores", "ocr", pl.Int64, {"ocr_area": pl.Float64, "ocr_text": pl.String})
    return score_partition(
        context, config, lakehouse, table, rows,
        lambda: OcrScorer(backend=model_store.ocr_backend, paddle_det_dir=model_store.paddle_det_dir,
                          paddle_rec_dir=model_store.paddle_rec_dir),
        lambda scorer, r: scorer.score(kept(r, "ocr")[0]),
        columns=ocr_columns,
    )


@batch_asset(deps=[clips], kinds={"pytorch", "parquet"})
def aesthetic_scores(context: AssetExecutionContext, config: ScoringConfig, lakehouse: Lakehouse, model_store: ModelStore) -> MaterializeResult:
    """`aes`: LAION improved-aesthetic MLP on CLIP ViT-L/14 features, mean of frames at 10/50/90%."""
    from models.scorers.aesthetic import AestheticScorer

    rows = lakehouse.read_partition("clips", batch_key(context.partition_key)).to_dicts()
    return score_partition(
        context, config, lakehouse, ScoreTable("aesthetic_scores", "aes"), rows,
        lambda: AestheticScorer(model_store.clip_checkpoint, model_store.aesthetic_mlp, device=model_store.device,
                                clip_model_name=model_store.clip_model_name),
        lambda scorer, r: scorer.score_clips([kept(r, "aesthetic")])[0],
    )


@batch_asset(deps=[clips, captions], kinds={"pytorch", "parquet"})
def match_scores(context: AssetExecutionContext, config: ScoringConfig, lakehouse: Lakehouse, model_store: ModelStore) -> MaterializeResult:
    """`match`: 100 * cos(CLIP image features of the middle frame, CLIP text features of the caption)."""
    from models.scorers.clip_match import ClipMatchScorer

    batch = batch_key(context.partition_key)
    rows = lakehouse.read_partition("clips", batch).join(
        lakehouse.read_partition("captions", batch).select("id", "text"), on="id", how="left").to_dicts()
    return score_partition(
        context, config, lakehouse, ScoreTable("match_scores", "match"), rows,
        lambda: ClipMatchScorer(model_store.clip_checkpoint, model_name=model_store.clip_model_name, device=model_store.device),
        lambda scorer, r: scorer.score(kept(r, "match"), [r["text"]])[0],
        unscorable=lambda r: None if r.get("text") else "clip has no caption",
    )


SCORE_ASSETS = [aesthetic_scores, motion_scores, ocr_scores, match_scores]
