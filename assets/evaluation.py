"""Evaluation assets: score the newest trained checkpoint, log to its MLflow run, keep the best one registered.

``model_evaluation`` samples the fixed prompt set from the checkpoint the latest ``trained_model`` materialization
produced, computes the metrics of ``training.evaluate`` (validation loss on the held-out split, flicker, motion,
weight-free prompt adherence beside its step-0 and shuffled-prompt controls, and CLIP/aesthetic/VBench where their
weights are local), logs them to the training run, registers the checkpoint as a new model version when it beats
the registered best of its cohort (by CLIP score with CLIP weights, else prompt adherence, else validation loss),
and appends a row to the ``evaluations`` table. ``not_worse_than_best`` reports the comparison made before
registering.
"""

import base64
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import get_args

import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    AssetKey,
    Config,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field, field_validator

from models.schedulers import SchedulerName
from resources.lakehouse import Lakehouse
from resources.model_store import ModelStore
from resources.tracking import Tracking
from training import evaluate as ev  # cheap: torch and friends are imported inside its functions
from training import registry
from training.eval_report import log_to_mlflow
from training.prompt_sets import load_prompt_set
from training.video_metrics import ADHERENCE_CRITERIA

EVALUATIONS_TABLE = "evaluations"
GIF_EMBED_MAX_BYTES = 512 * 1024  # larger previews are linked by path, not inlined into the event log


class EvaluationConfig(Config):
    prompt_set: str = Field("v1", description="Packaged prompt set (training/prompts/eval_prompts_<name>.txt) or a .txt path.")
    max_prompts: int | None = Field(None, description="Use only the first N prompts (quick looks); None = the whole set.")
    num_frames: int | None = Field(None, description="Frames per sample; None = the trained preset's (its largest "
                                                       "video bucket), as for height and width.")
    height: int | None = Field(None, description="Sample height in pixels; None = the trained preset's resolution.")
    width: int | None = Field(None, description="Sample width in pixels; None = the trained preset's resolution.")
    scheduler: str | None = Field(None, description="iddpm / dpm-solver / rflow; None = the fast one for the objective "
                                                    "(dpm-solver for IDDPM checkpoints, rflow for rectified flow).")
    num_sampling_steps: int | None = Field(20, description="None = the scheduler's default (iddpm 100, dpm-solver 20, rflow 30).")
    cfg_scale: float = 7.0
    seed: int = Field(42, description="Prompt i is sampled with seed + i.")
    checkpoint: str | None = Field(None, description="Evaluate this step-* folder (or a run folder's newest step) "
                                                     "instead of trained_model's final checkpoint.")
    model_name: str = Field("opensora-stdit2", description="MLflow registered model that holds the best checkpoints "
                                                        "(demo checkpoints, trained with tiny random encoders, use "
                                                        "<model_name>-demo).")
    vbench_dir: str | None = Field(None, description="VBench weights folder; unset = $VBENCH_CACHE_DIR or ~/.cache/vbench.")
    val_max_samples: int | None = Field(None, description="Held-out clips scored; None = the training config's val_max_samples.")
    embed_previews: int = Field(4, description="GIF previews inlined into the materialization's markdown.")
    baseline_step0: bool = Field(True, description="Also sample the untrained (step-0) model and report its prompt "
                                                   "adherence beside the trained one's (samples the set twice).")

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, v: str | None) -> str | None:
        # Dagster config has no optional Literal, so the choice is checked here, before any sampling starts.
        if v is not None and v not in get_args(SchedulerName):
            raise ValueError(f"unknown scheduler {v!r}; choose from {', '.join(get_args(SchedulerName))}")
        return v


def latest_trained_checkpoint(context: AssetExecutionContext) -> tuple[Path, str | None]:
    """(final checkpoint, MLflow run id) of the latest ``trained_model`` materialization."""
    event = context.instance.get_latest_materialization_event(AssetKey("trained_model"))
    if event is None or event.asset_materialization is None:
        raise ValueError("trained_model has never been materialized: train a model first (or set config.checkpoint)")
    metadata = event.asset_materialization.metadata
    if "final_checkpoint" not in metadata:
        raise ValueError(f"the latest trained_model materialization has no final_checkpoint (metadata: {sorted(metadata)})")
    run_id = metadata.get("mlflow_run_id")
    return Path(str(metadata["final_checkpoint"].value)), (str(run_id.value) or None) if run_id is not None else None


def evaluation_dir(lakehouse: Lakehouse, checkpoint: Path, prompt_set_version: str) -> Path:
    """``media/evaluations/<checkpoint path under checkpoints/>/<prompt set>``; outside checkpoints/ by path hash.

    With the data path on an object store the samples stay under the local ``OPENSORA_HOME/media/`` (like the
    checkpoints they come from); MLflow keeps them as artifacts of the training run either way."""
    try:
        parts = checkpoint.resolve().relative_to(lakehouse.checkpoints_dir).parts
    except ValueError:
        parts = ("external", hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:12], checkpoint.name)
    media = lakehouse.root / "media" if lakehouse.location.remote else lakehouse.media_dir
    folder = media.joinpath("evaluations", *parts, prompt_set_version)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def previews_markdown(report, limit: int) -> str:
    """A table of the samples; the first ``limit`` GIFs inlined as data: URIs (the UI renders markdown images)."""
    lines = ["| # | prompt | preview | adherence | flicker | motion |", "|---|---|---|---|---|---|"]
    for sample in report.samples:
        gif = Path(sample.files.get("gif", ""))
        cell = "(not inlined)"
        if sample.index < limit and gif.is_file() and gif.stat().st_size <= GIF_EMBED_MAX_BYTES:
            cell = f"![sample {sample.index}](data:image/gif;base64,{base64.b64encode(gif.read_bytes()).decode()})"
        flicker, motion = sample.metrics.get("temporal_flicker"), sample.metrics.get("motion")
        adherence = sample.metrics.get("prompt_adherence")
        why = getattr(sample, "adherence", "").replace("|", "/")
        lines.append(f"| {sample.index} | {sample.prompt.replace('|', '/')} | {cell} | "
                     f"{'' if adherence is None else f'{adherence:.2f}'} {why} | "
                     f"{'' if flicker is None else f'{flicker:.2f}'} | {'' if motion is None else f'{motion:.2f}'} |")
    return "\n".join(lines)


def adherence_markdown(metrics: dict) -> str:
    """Prompt adherence of the trained checkpoint beside its two controls, overall and per criterion: the margins
    say how much training taught (vs step 0) and how much of it follows the text (vs shuffled prompts)."""
    if "prompt_adherence" not in metrics:
        return "not measured (no prompt of the set names a colour, shape, motion or title)"
    columns = (("trained", ""), ("step 0 (untrained)", "_step0"), ("shuffled prompts", "_shuffled"))
    lines = ["| criterion | " + " | ".join(c for c, _ in columns) + " | margin vs step 0 | margin vs shuffled |",
             "|---|---|---|---|---|---|"]
    for criterion in ("", *(f"/{c}" for c in ADHERENCE_CRITERIA)):
        values = [metrics.get(f"prompt_adherence{suffix}{criterion}") for _, suffix in columns]
        if values[0] is None:
            continue
        cells = ["" if v is None else f"{v:.2f}" for v in values]
        margins = ["" if v is None else f"{values[0] - v:+.2f}" for v in values[1:]]
        lines.append(f"| {criterion.lstrip('/') or 'mean'} | " + " | ".join(cells + margins) + " |")
    return "\n".join(lines)


def evaluation_row(report, run_id: str | None, decision, best_before: float | None) -> dict:
    m = report.metrics
    return {
        "checkpoint": report.checkpoint, "step": report.step, "run_folder": str(Path(report.checkpoint).parent),
        "dataset_version": report.dataset_version, "prompt_set": report.prompt_set, "objective": report.objective,
        "evaluated_at": datetime.now(timezone.utc), "val_loss": m.get("val_loss"), "clip_score": m.get("clip_score"),
        "aesthetic": m.get("aesthetic"), "motion": m.get("motion"), "temporal_flicker": m.get("temporal_flicker"),
        "prompt_adherence": m.get("prompt_adherence"), "prompt_adherence_shuffled": m.get("prompt_adherence_shuffled"),
        "metrics": json.dumps(m, sort_keys=True), "skipped": json.dumps(report.skipped, sort_keys=True),
        "num_samples": len(report.samples), "samples_dir": str(Path(report.out_dir) / "samples"),
        "mlflow_run_id": run_id, "registered_version": decision.version, "is_best": decision.is_best,
        "best_val_loss_before": best_before,
    }


def write_evaluation_row(lakehouse: Lakehouse, row: dict, run_id: str | None = None) -> tuple[int, int]:
    """Replace this (checkpoint, prompt set)'s row, in one transaction that touches no other checkpoint's row (two
    evaluations finishing together both keep theirs). Returns (lake snapshot, number of evaluation rows)."""
    new = pl.DataFrame([row], schema_overrides={"val_loss": pl.Float64, "clip_score": pl.Float64, "aesthetic": pl.Float64,
                                                "motion": pl.Float64, "temporal_flicker": pl.Float64,
                                                "best_val_loss_before": pl.Float64, "registered_version": pl.String,
                                                "mlflow_run_id": pl.String, "dataset_version": pl.String,
                                                "prompt_adherence": pl.Float64, "prompt_adherence_shuffled": pl.Float64})
    snapshot = lakehouse.write_partition(EVALUATIONS_TABLE, None, new, run_id=run_id,
                                         key={"checkpoint": row["checkpoint"], "prompt_set": row["prompt_set"]})
    return snapshot, len(lakehouse.read_table(EVALUATIONS_TABLE, snapshot=snapshot))


@asset(
    deps=["trained_model"],
    group_name="evaluation",
    pool="gpu",
    kinds={"pytorch", "mlflow", "parquet"},
    description="Samples of the fixed prompt set and metrics (held-out val loss, flicker, motion, CLIP, aesthetic, "
                "VBench where weights are local) of the newest trained checkpoint; registers it in MLflow when best.",
)
def model_evaluation(
    context: AssetExecutionContext,
    config: EvaluationConfig,
    lakehouse: Lakehouse,
    tracking: Tracking,
    model_store: ModelStore,
) -> MaterializeResult:
    # 1. Which checkpoint, which prompts, at which shape
    if config.checkpoint:
        checkpoint, run_id = ev.checkpoint_to_evaluate(config.checkpoint), None
    else:
        checkpoint, run_id = latest_trained_checkpoint(context)
    state = ev.checkpoint_state(checkpoint)
    prompt_set = load_prompt_set(config.prompt_set).first(config.max_prompts)
    num_frames, image_size, scheduler = ev.sampling_settings(state, num_frames=config.num_frames, height=config.height,
                                                             width=config.width, scheduler=config.scheduler)
    model_name = registry.registry_model_name(config.model_name, state)
    out_dir = evaluation_dir(lakehouse, checkpoint, prompt_set.version)
    context.log.info(f"evaluating {checkpoint} on prompt set {prompt_set.version} ({len(prompt_set)} prompts) into {out_dir}")

    # 2. Samples, metrics, validation loss
    report = ev.evaluate_checkpoint(
        checkpoint, prompt_set, out_dir,
        clip_checkpoint=model_store.clip_checkpoint, clip_model_name=model_store.clip_model_name,
        aesthetic_mlp=model_store.aesthetic_mlp, num_frames=num_frames, image_size=image_size,
        steps=config.num_sampling_steps, scheduler=scheduler, cfg_scale=config.cfg_scale, seed=config.seed,
        device=model_store.device, flow_backend=model_store.flow_backend, vbench_dir=config.vbench_dir,
        val_max_samples=config.val_max_samples, baseline_step0=config.baseline_step0, log=context.log.info,
    )
    report.mlflow_run_id = run_id or report.mlflow_run_id
    for name, reason in report.skipped.items():
        context.log.warning(f"{name}: {reason}")

    # 3. MLflow: compare with the registered best (by CLIP score with CLIP weights, else prompt adherence, else
    #    val_loss: report.ranked_by) and register if better, in one decision; then log to the training run
    uri = tracking.uri(lakehouse.root)
    decision = registry.register_if_best(report, uri, model_name, run_id=report.mlflow_run_id)
    context.log.info(f"registry: {decision.reason}" + (f" -> {model_name} v{decision.version}" if decision.version else ""))
    logged_run = log_to_mlflow(report, uri, run_id=report.mlflow_run_id)

    # 4. One row per (checkpoint, prompt set) in the evaluations table
    snapshot, num_evaluations = write_evaluation_row(lakehouse, evaluation_row(report, logged_run, decision, decision.best_val_loss_before),
                                                     run_id=context.run.run_id)

    # 5. Metadata: numbers, reasons, previews
    metadata = evaluation_metadata(report, decision, model_name=model_name, logged_run=logged_run,
                                   num_evaluations=num_evaluations, snapshot=snapshot,
                                   embed_previews=config.embed_previews)
    return MaterializeResult(metadata=metadata, data_version=DataVersion(f"{Path(report.checkpoint).name}-{report.prompt_set}"))


def evaluation_metadata(report, decision, *, model_name: str, logged_run: str, num_evaluations: int, snapshot: int, embed_previews: int) -> dict:
    """The materialization's metadata: the numbers (each metric a float, for the UI's plots), the registry's
    decision, why metrics were skipped, previews and sample paths."""
    metadata: dict = {
        "checkpoint": MetadataValue.path(report.checkpoint), "step": report.step, "prompt_set": report.prompt_set,
        "scheduler": f"{report.settings['scheduler']} x {report.settings['steps']} steps",
        "mlflow_run_id": logged_run, "registry": decision.reason, "is_best": decision.is_best,
        "registered_model": model_name, **{f"cohort_{k}": v for k, v in report.cohort.items()},
        "ranked_by": report.ranked_by, "not_worse_than_best": decision.not_worse, "num_evaluations": num_evaluations,
        "lake_snapshot": snapshot, "prompt_adherence_vs_controls": MetadataValue.md(adherence_markdown(report.metrics)),
        "report": MetadataValue.path(str(Path(report.out_dir) / "report.json")),
        "metrics": MetadataValue.json(report.metrics),
        "skipped": MetadataValue.md("\n".join(f"- **{k}**: {v}" for k, v in sorted(report.skipped.items())) or "none"),
        "previews": MetadataValue.md(previews_markdown(report, embed_previews)),
    }
    metadata.update({k.replace("/", "."): MetadataValue.float(float(v)) for k, v in report.metrics.items()})
    best_before = decision.best_before
    if best_before is not None:
        metadata["best_before"] = MetadataValue.float(best_before)
        if report.ranked_by == "val_loss":
            metadata["best_val_loss_before"] = MetadataValue.float(best_before)
    if decision.version:
        metadata["registered_version"] = f"{model_name} v{decision.version}"
    for sample in report.samples:
        video = sample.files.get("mp4") or sample.files.get("png")
        if video:
            metadata[f"sample_{sample.index:02d}"] = MetadataValue.path(video)
    return metadata


@asset_check(
    asset=model_evaluation,
    blocking=False,
    description="The new checkpoint ranks no worse than the best registered version of its cohort (passes when none "
                "is registered yet), as compared by model_evaluation before it registered anything. Ranked by CLIP score "
                "with CLIP weights, else by weight-free prompt adherence, else by held-out val_loss.",
)
def not_worse_than_best(context: AssetCheckExecutionContext) -> AssetCheckResult:
    event = context.instance.get_latest_materialization_event(AssetKey("model_evaluation"))
    if event is None or event.asset_materialization is None:
        return AssetCheckResult(passed=False, metadata={"reason": "model_evaluation has not been materialized"})
    meta = event.asset_materialization.metadata
    metric = str(meta["ranked_by"].value) if "ranked_by" in meta else "val_loss"
    value = meta[metric].value if metric in meta else None
    best = meta["best_before"].value if "best_before" in meta else (
        meta["best_val_loss_before"].value if "best_val_loss_before" in meta else None)
    checkpoint = str(meta["checkpoint"].value) if "checkpoint" in meta else "unknown"
    if value is None:
        return AssetCheckResult(passed=False, metadata={"checkpoint": checkpoint, "ranked_by": metric, "reason": f"no "
                                f"{metric} was computed (see the materialization's 'skipped'): the checkpoint is not "
                                "shown to be no worse"})
    passed = best is None or registry.not_worse(float(value), float(best), metric, registry.VAL_LOSS_REL_TOL)
    return AssetCheckResult(
        passed=passed,
        metadata={
            "checkpoint": checkpoint,
            "ranked_by": metric,
            metric: MetadataValue.float(float(value)),
            f"best_registered_{metric}": MetadataValue.float(float(best)) if best is not None else "none registered",
            "registry": str(meta["registry"].value) if "registry" in meta else "",
        },
    )


EVALUATION_ASSETS = [model_evaluation]
EVALUATION_CHECKS = [not_worse_than_best]
