"""Score assets, one per scorer so they run, fail and backfill independently.

Each reads the frames the cutting pass kept for it (never the video again) and writes a table keyed by the clip
``id`` with its Open-Sora column (``aes``, ``flow``, ``ocr``, ``match``) and a ``reason`` column. A scorer whose
weights are not on local disk writes nulls with the reason (never numbers from random weights); the dataset
filter then fails that criterion for every clip unless its spec skips it.

A clip whose frames cannot be read is quarantined (input rejected). An exception from the scorer itself is a
component error: quarantined with its reason while rare, and the asset fails with a summary when more than
``max_component_error_share`` of the clips raise one (``ScoringConfig``, ``$OPENSORA_MAX_COMPONENT_ERROR_SHARE``).
"""

import polars as pl
from dagster import AssetExecutionContext, MaterializeResult, asset

from assets.curation import IsolationConfig, captions, clips, markdown_table, quarantine_rows, run_isolated, save_batch
from assets.partitions import video_batches
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


def finish(context, lakehouse: Lakehouse, table: str, frame: pl.DataFrame, column: str, quarantined: list[dict]) -> MaterializeResult:
    written = save_batch(context, lakehouse, table, batch_key(context.partition_key), frame, table, quarantined)
    return MaterializeResult(metadata={**written, **summary(frame, column), "preview": markdown_table(frame)})


def without_weights(context, lakehouse: Lakehouse, table: str, column: str, ids: list[str], err: Exception, dtype,
                    extra: dict[str, pl.DataType] | None = None) -> MaterializeResult:
    """The table of a scorer whose weights are not on local disk: every value null, the error as every reason.

    ``extra``: further columns of the scorer's table (name: dtype), all null."""
    context.log.warning(f"{table} skipped: {err}")
    frame = score_table(ids, column, {}, {i: str(err) for i in ids}, dtype)
    frame = frame.with_columns(pl.lit(None, dtype=dtype_).alias(name) for name, dtype_ in (extra or {}).items())
    return finish(context, lakehouse, table, frame, column, [])


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


@asset(deps=[clips], partitions_def=video_batches, group_name="curation", code_version="1", kinds={"opencv", "parquet"},
       description="`flow`: mean optical-flow magnitude over frames 0/10/20/30 at 320x576 (OpenCV, no weights).")
def motion_scores(context: AssetExecutionContext, config: ScoringConfig, lakehouse: Lakehouse, model_store: ModelStore) -> MaterializeResult:
    from curation.kept_frames import load_kept_frames
    from models.scorers.motion import motion_score

    rows = lakehouse.read_partition("clips", batch_key(context.partition_key)).to_dicts()
    values, quarantined, reasons = scored(context, "motion_scores", rows,
                                          lambda r: motion_score(load_kept_frames(local_media_path(r["frames_dir"]), "flow"), backend=model_store.flow_backend),
                                          config)
    frame = score_table([r["id"] for r in rows], "flow", values, reasons, pl.Float64)
    return finish(context, lakehouse, "motion_scores", frame, "flow", quarantined)


@asset(deps=[clips], partitions_def=video_batches, group_name="curation", code_version="1", kinds={"onnx", "parquet"},
       description="`ocr`: text boxes with score > 0.3 on one frame (PP-OCR via rapidocr), plus text area fraction.")
def ocr_scores(context: AssetExecutionContext, config: ScoringConfig, lakehouse: Lakehouse, model_store: ModelStore) -> MaterializeResult:
    from curation.kept_frames import load_kept_frames
    from models.scorers import WeightsUnavailable
    from models.scorers.ocr import OcrScorer

    rows = lakehouse.read_partition("clips", batch_key(context.partition_key)).to_dicts()
    ids = [r["id"] for r in rows]
    try:
        scorer = OcrScorer(backend=model_store.ocr_backend, paddle_det_dir=model_store.paddle_det_dir, paddle_rec_dir=model_store.paddle_rec_dir)
    except WeightsUnavailable as err:
        return without_weights(context, lakehouse, "ocr_scores", "ocr", ids, err, pl.Int64, {"ocr_area": pl.Float64, "ocr_text": pl.String})
    values, quarantined, reasons = scored(context, "ocr_scores", rows, lambda r: scorer.score(load_kept_frames(local_media_path(r["frames_dir"]), "ocr")[0]),
                                          config)
    frame = score_table(ids, "ocr", {i: v.num_boxes for i, v in values.items()}, reasons, pl.Int64).with_columns(
        pl.Series("ocr_area", [values[i].area_fraction if i in values else None for i in ids], dtype=pl.Float64),
        pl.Series("ocr_text", [" | ".join(values[i].texts) if i in values else None for i in ids], dtype=pl.String),
    )
    return finish(context, lakehouse, "ocr_scores", frame, "ocr", quarantined)


@asset(deps=[clips], partitions_def=video_batches, group_name="curation", code_version="1", kinds={"pytorch", "parquet"},
       description="`aes`: LAION improved-aesthetic MLP on CLIP ViT-L/14 features, mean of frames at 10/50/90%.")
def aesthetic_scores(context: AssetExecutionContext, config: ScoringConfig, lakehouse: Lakehouse, model_store: ModelStore) -> MaterializeResult:
    from curation.kept_frames import load_kept_frames
    from models.scorers import WeightsUnavailable
    from models.scorers.aesthetic import AestheticScorer

    rows = lakehouse.read_partition("clips", batch_key(context.partition_key)).to_dicts()
    ids = [r["id"] for r in rows]
    try:
        scorer = AestheticScorer(model_store.clip_checkpoint, model_store.aesthetic_mlp, device=model_store.device,
                                 clip_model_name=model_store.clip_model_name)
    except WeightsUnavailable as err:
        return without_weights(context, lakehouse, "aesthetic_scores", "aes", ids, err, pl.Float64)
    values, quarantined, reasons = scored(context, "aesthetic_scores", rows,
                                          lambda r: scorer.score_clips([load_kept_frames(local_media_path(r["frames_dir"]), "aesthetic")])[0], config)
    return finish(context, lakehouse, "aesthetic_scores", score_table(ids, "aes", values, reasons, pl.Float64), "aes", quarantined)


@asset(deps=[clips, captions], partitions_def=video_batches, group_name="curation", code_version="1", kinds={"pytorch", "parquet"},
       description="`match`: 100 * cos(CLIP image features of the middle frame, CLIP text features of the caption).")
def match_scores(context: AssetExecutionContext, config: ScoringConfig, lakehouse: Lakehouse, model_store: ModelStore) -> MaterializeResult:
    from curation.kept_frames import load_kept_frames
    from models.scorers import WeightsUnavailable
    from models.scorers.clip_match import ClipMatchScorer

    batch = batch_key(context.partition_key)
    rows = lakehouse.read_partition("clips", batch).join(
        lakehouse.read_partition("captions", batch).select("id", "text"), on="id", how="left").to_dicts()
    ids = [r["id"] for r in rows]
    try:
        scorer = ClipMatchScorer(model_store.clip_checkpoint, model_name=model_store.clip_model_name, device=model_store.device)
    except WeightsUnavailable as err:
        return without_weights(context, lakehouse, "match_scores", "match", ids, err, pl.Float64)
    with_text = [r for r in rows if r.get("text")]
    values, quarantined, reasons = scored(context, "match_scores", with_text,
                                          lambda r: scorer.score(load_kept_frames(local_media_path(r["frames_dir"]), "match"), [r["text"]])[0], config)
    reasons.update({r["id"]: "clip has no caption" for r in rows if not r.get("text")})
    return finish(context, lakehouse, "match_scores", score_table(ids, "match", values, reasons, pl.Float64), "match", quarantined)


SCORE_ASSETS = [aesthetic_scores, motion_scores, ocr_scores, match_scores]
