"""The MLflow model registry of evaluated checkpoints: which one is best, and registering it.

    decision = register_if_best(report, tracking_uri)   # a model version + aliases "best" and "best-<cohort>"
    passed, best = compare_to_best(value, tracking_uri, cohort=report.cohort)

Checkpoints are compared only within a cohort (``EvaluationReport.cohort``: dataset version, preset, objective and,
for prompt metrics, the ranking metric and prompt set), by the report's ranking metric (``EvaluationReport.ranked_by``:
CLIP score, else prompt adherence, else held-out validation loss), within a relative tolerance.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.eval_report import EvaluationReport, ensure_run, mlflow_client

DEFAULT_MODEL_NAME = "opensora-stdit2"
BEST_ALIAS = "best"
VAL_LOSS_REL_TOL = 1e-6  # CPU float reductions may differ in the last bits between runs (MKL picks thread counts)

# Metric -> True when higher is better. The registry ranks by the first of these a report has (EvaluationReport.ranked_by).
RANKING_METRICS = {"clip_score": True, "prompt_adherence": True, "val_loss": False}


@dataclass
class RegistryDecision:
    is_best: bool
    best_before: float | None  # the best registered value of ``ranked_by`` in the cohort before this decision
    version: str | None  # the model version registered now (None when not the best)
    reason: str = ""
    ranked_by: str = "val_loss"
    not_worse: bool = False  # the value is no worse than ``best_before`` (the check's verdict: ``passes``)

    @property
    def best_val_loss_before(self) -> float | None:
        return self.best_before if self.ranked_by == "val_loss" else None


def is_better(value: float, best: float, metric: str, rel_tol: float) -> bool:
    """Strictly better than ``best`` by more than ``rel_tol`` (re-evaluating the same weights never is)."""
    margin = rel_tol * max(abs(best), 1e-12)
    return value > best + margin if RANKING_METRICS[metric] else value < best - margin


def not_worse(value: float, best: float, metric: str, rel_tol: float) -> bool:
    margin = rel_tol * max(abs(best), 1e-12)
    return value >= best - margin if RANKING_METRICS[metric] else value <= best + margin


def passes(value: float | None, best: float | None, metric: str, rel_tol: float) -> bool:
    """No worse than the best comparable value, or nothing comparable yet; a missing value never passes (a checkpoint
    that could not be scored is not shown to be no worse)."""
    return value is not None and (best is None or not_worse(value, best, metric, rel_tol))


def registry_model_name(base: str, state: dict[str, Any]) -> str:
    """Checkpoints trained with tiny random encoders (the demo) register as ``<base>-demo``, never beside real ones."""
    encoders = (state.get("config") or {}).get("encoders") or {}
    demo = encoders.get("text_encoder") is None or encoders.get("vae") is None
    return f"{base}-demo" if demo else base


def _check_model_name(model_name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", model_name):
        raise ValueError(f"registered model names are letters, digits, '_', '.', '-' (got {model_name!r})")
    return model_name


def cohort_alias(cohort: dict[str, str]) -> str:
    """The alias of a cohort's best version (MLflow aliases are short identifiers: a digest of the cohort)."""
    digest = hashlib.blake2b(json.dumps(cohort, sort_keys=True).encode(), digest_size=5).hexdigest()
    return f"{BEST_ALIAS}-{digest}"


def best_version(tracking_uri: str, model_name: str = DEFAULT_MODEL_NAME, cohort: dict[str, str] | None = None):
    """The registered version with the best ranking metric among those comparable with ``cohort`` (same tags for
    dataset_version, preset, objective and, for prompt metrics, ranked_by and prompt_set), or None. The metric is
    the cohort's ``ranked_by`` (versions registered before there was one were ranked by val_loss). Without a cohort:
    the one holding the ``best`` alias, else the lowest ``val_loss`` of all."""
    from mlflow.exceptions import MlflowException

    _check_model_name(model_name)  # it is pasted into a search filter below
    client = mlflow_client(tracking_uri)
    if cohort is None:
        try:
            return client.get_model_version_by_alias(model_name, BEST_ALIAS)
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
    metric = (cohort or {}).get("ranked_by", "val_loss")
    versions = [v for v in client.search_model_versions(f"name = '{model_name}'") if metric in v.tags]
    if cohort is not None:
        tags = {"ranked_by": "val_loss", **cohort}  # a version without the tag was ranked by val_loss
        versions = [v for v in versions if all(v.tags.get(k, "val_loss" if k == "ranked_by" else None) == str(value)
                                               for k, value in tags.items())]
    sign = -1.0 if RANKING_METRICS[metric] else 1.0
    return min(versions, key=lambda v: sign * float(v.tags[metric]), default=None)


def compare_to_best(value: float | None, tracking_uri: str, model_name: str = DEFAULT_MODEL_NAME,
                    rel_tol: float = VAL_LOSS_REL_TOL, cohort: dict[str, str] | None = None) -> tuple[bool, float | None]:
    """(passed, best comparable value registered) for the cohort's ranking metric (``cohort["ranked_by"]``,
    default val_loss): passes when nothing comparable is registered yet or ``value`` is no worse than the best
    (within ``rel_tol``: re-evaluating the same weights is never "worse" because of float noise). ``register_if_best``
    returns the same verdict in its decision (``not_worse``), from the same query.
    """
    metric = (cohort or {}).get("ranked_by", "val_loss")
    best = best_version(tracking_uri, model_name, cohort)
    best_value = float(best.tags[metric]) if best is not None and metric in best.tags else None
    return passes(value, best_value, metric, rel_tol), best_value


def register_if_best(report: EvaluationReport, tracking_uri: str, model_name: str = DEFAULT_MODEL_NAME,
                     run_id: str | None = None, rel_tol: float = VAL_LOSS_REL_TOL) -> RegistryDecision:
    """Register the checkpoint's ``ema/`` folder as a new model version when its ranking metric
    (``report.ranked_by``: CLIP score with CLIP weights, else prompt adherence, else val_loss) beats the best
    registered version of its cohort by more than ``rel_tol``, or when nothing comparable is registered yet. Other
    cohorts are never compared.

    The folder is logged as artifacts of the training run (``checkpoints/step-N/ema``) and the version's source is
    ``runs:/<run>/checkpoints/step-N/ema``; each version carries tags val_loss, the ranking metric, checkpoint,
    step, dataset_version, preset, prompt_set and objective (and ranked_by), and the aliases ``best`` (the newest
    cohort best) and ``best-<cohort digest>``. The checkpoint that already is its cohort's best is never
    registered twice.
    """
    from mlflow.exceptions import MlflowException

    metric, value = report.ranked_by, report.ranking_value
    cohort = report.cohort
    where = ", ".join(f"{k} {v}" for k, v in cohort.items())
    current = best_version(tracking_uri, model_name, cohort)
    best = float(current.tags[metric]) if current is not None and metric in current.tags else None

    def decision(reason: str, version: str | None = None) -> RegistryDecision:
        return RegistryDecision(version is not None, best, version, reason, metric, passes(value, best, metric, rel_tol))

    if value is None:
        return decision(f"no {metric}: {report.skipped.get(metric, 'not computed')}")
    if current is not None and current.tags.get("checkpoint") == report.checkpoint:
        return decision(f"{report.checkpoint} is already the best of {where} (version {current.version})")
    if best is not None and not is_better(value, best, metric, rel_tol):
        return decision(f"{metric} {value:.6g} is not {'above' if RANKING_METRICS[metric] else 'below'} the best "
                        f"{best:.6g} of {where}")
    if not report.ema_dir.is_dir():
        raise FileNotFoundError(f"no EMA weights to register at {report.ema_dir}")

    client = mlflow_client(tracking_uri)
    run_id = ensure_run(client, tracking_uri, run_id, report)
    artifact_path = f"checkpoints/{Path(report.checkpoint).name}/ema"
    client.log_artifacts(run_id, str(report.ema_dir), artifact_path)
    try:
        client.create_registered_model(model_name, description="Open-Sora 1.1 STDiT2 EMA weights (Hugging Face-format "
                                                                "folder), best by CLIP score, else weight-free prompt "
                                                                "adherence, else held-out validation loss.")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {"checkpoint": report.checkpoint, "step": str(report.step), "prompt_set": report.prompt_set,
            "ranked_by": metric, **cohort, metric: repr(float(value))}
    if report.val_loss is not None:
        tags["val_loss"] = repr(float(report.val_loss))
    version = client.create_model_version(model_name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags,
                                          description=f"{report.checkpoint} ({metric} {value:.6g}; {where})")
    client.set_registered_model_alias(model_name, BEST_ALIAS, version.version)
    client.set_registered_model_alias(model_name, cohort_alias(cohort), version.version)
    before = f"nothing comparable registered ({where})" if best is None else f"previous best {best:.6g} of {where}"
    return decision(f"{metric} {value:.6g} ({before})", str(version.version))
