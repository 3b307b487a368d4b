"""Train STDiT2 on a dataset version: the torchrun entry point and ``opensora-dag train``.

    opensora-dag train PRESET --dataset VERSION|PATH [--nproc N] [--steps N] [--ckpt-every K] [--outdir DIR] [--resume [RUN]]

Run with ``--nproc N`` (or under ``torchrun`` directly) it trains on N processes through a ColossalAI ``Booster``:
``LowLevelZeroPlugin(stage=2)`` in bf16 on CUDA, ``TorchDDPPlugin`` over gloo on CPU. Every source of randomness in
a step (timesteps, noise, frame masks, caption dropout) comes from a generator seeded by (seed, step, rank), and the
sampler saves its position, so a run killed at any point and resumed from its last checkpoint continues with the
same losses as one that never stopped (bitwise on CPU).

Every run trains in its own folder ``<outdir>/run-NNN`` and holds its lease while it runs (training/runs.py):
without ``--resume`` a new run starts; ``--resume`` continues the newest run (``--resume RUN`` a named one) and is
refused while another live process trains it. A run that cannot start as asked exits with status 2 and says why.

Under Dagster (``DAGSTER_PIPES_CONTEXT`` set by the launcher) rank 0 reports progress and the final
materialization through dagster-pipes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the config needs pydantic and PyYAML; the building blocks here need only torch
    from training.config import TrainConfig

from training.arguments import TRAIN_DESCRIPTION, add_train_arguments, train_worker_argv
from training.build import encode_batch, unwrap
from training.distributed import Dist, broadcast_object, free_port, setup_distributed
from training.run_setup import Position, RunData, RunParts, build_parts, prepare_data, resume_run, start_tracking
from training.steps import step_generator, train_step
from training.validation import bucket_name, build_validation_set, validation_losses


# --------------------------------------------------------------------------------------------------------------
# The loop: its setup (training.run_setup), one step (training.steps), validation (training.validation)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    outdir: str
    """The run folder (``<root>/run-NNN``)."""
    final_checkpoint: str
    steps: int
    mlflow_run_id: str | None
    mlflow_run_url: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    bucket_report: dict[str, Any] = field(default_factory=dict)
    mlflow_not_logged: str | None = None
    """What MLflow did not get (it was failing), in words; None when it got everything."""


def train(
    cfg: TrainConfig,
    dataset: str,
    outdir: str | Path,
    resume: bool | str | None = None,
    tracking_uri: str | None = None,
    log=print,
) -> TrainResult:
    """Train in a run folder under ``outdir``: a new ``run-NNN`` unless ``resume`` says which run to continue
    (True or "latest": the newest; "auto": the newest if unfinished and not held, else a new one; a name or path).

    Raises :class:`training.runs.ResumeError` (on every rank) when the run cannot be started as asked.
    """
    from training import runs

    # 1. Processes, seeds, the run folder and its lease (rank 0 decides and holds the lease; every rank follows)
    dist = setup_distributed()
    torch.manual_seed(cfg.seed)
    say = log if dist.is_main else (lambda *_: None)
    lease, decision = None, {}
    if dist.is_main:
        try:
            run_dir, lease = runs.open_run(Path(outdir), resume, log=say)
            lease.heartbeat()
            runs.clean_stale(run_dir)
            decision = {"run_dir": str(run_dir)}
        except runs.ResumeError as err:
            decision = {"error": str(err), "busy": isinstance(err, runs.RunBusy)}
    decision = broadcast_object(decision, dist)
    if "error" in decision:
        raise (runs.RunBusy if decision["busy"] else runs.ResumeError)(decision["error"])
    run_dir = Path(decision["run_dir"])
    say(f"run folder {run_dir}")
    try:
        return _train_in_run(cfg, dataset, run_dir, tracking_uri, dist, say, lease)
    finally:
        if lease is not None:
            lease.release()


def _train_in_run(cfg: TrainConfig, dataset: str, run_dir: Path, tracking_uri: str | None, dist: Dist, say, lease) -> TrainResult:
    from training.throughput import ThroughputWindow, device_peak_tflops

    # 2. Data: rows, held-out split, buckets, sampler
    data = prepare_data(cfg, dataset, dist, say)

    # 3. Frozen encoders, model, EMA, optimizer through the booster
    parts = build_parts(cfg, dist, data)

    # 4. Resume: the newest complete checkpoint that loads on every rank, else the one before it
    pos, mlflow_run_id, latest = resume_run(cfg, run_dir, dist, say, parts, data.sampler)
    metrics_path = run_dir / "metrics.jsonl"
    if dist.is_main and metrics_path.is_file():  # steps after the checkpoint are trained again: drop their records
        metrics_path.write_text("".join(f"{line}\n" for line in metrics_path.read_text().splitlines() if _step_of_record(line, pos.step)))

    # 5. Tracking (rank 0 only; MLflow failures are buffered and retried, never fatal), the held-out set
    tracker = start_tracking(cfg, run_dir, tracking_uri, dist, say, data, parts.encoder_paths, mlflow_run_id, new_run=latest is None)
    val = build_validation_set(data.val_rows, data.bucket, data.preset.frame_interval, cfg.seed, parts.text_encoder, parts.vae, dist,
                               cfg.val_max_samples, cache_dir=data.cache_dir / "val" if data.cache_dir is not None else None)
    validate = functools.partial(_validate, cfg, parts, val, tracker, say)
    first_val = validate(pos.step) if latest is None else {}

    # 6. Steps
    peak_tflops, peak_source = device_peak_tflops(dist.device)
    say(f"MFU against {peak_tflops} TFLOP/s bf16 ({peak_source})" if peak_tflops else f"MFU not logged: {peak_source}")
    window = ThroughputWindow(peak_tflops=peak_tflops, num_devices=dist.world_size)
    final_metrics: dict[str, float] = {}
    while pos.step < cfg.steps:
        data.sampler.set_epoch(pos.epoch)
        data.train_set.set_epoch(pos.epoch)
        loader = torch.utils.data.DataLoader(data.train_set, batch_sampler=data.sampler, collate_fn=data.collate_fn,
                                             num_workers=cfg.data.num_workers)
        for batch in loader:
            gen = step_generator(cfg.seed, pos.step, dist.rank, dist.device)
            enc = _encode(batch, data, parts, dist, gen)
            loss, grad_norm, lr = train_step(cfg, dist, parts.model, parts.booster, parts.optimizer, parts.scheduler, data.mask_generator,
                                             enc, gen, pos.step, parts.model_config.class_dropout_prob, parts.use_zero, parts.ema)
            pos.step += 1
            pos.epoch_step += 1
            final_metrics["loss"] = _log_step(cfg, dist, say, tracker, window, metrics_path, parts.model_config, pos, enc, loss, grad_norm, lr)

            if cfg.val_every and pos.step % cfg.val_every == 0 and pos.step < cfg.steps:
                validate(pos.step)
            if pos.step % cfg.ckpt_every == 0 or pos.step == cfg.steps:
                _save_checkpoint(cfg, run_dir, dist, lease, data, parts, tracker, pos)
            if pos.step >= cfg.steps:
                break
        else:
            pos.epoch += 1
            pos.epoch_step = 0

    # 7. Final validation, artifacts, summary
    final_metrics.update(validate(pos.step))
    if first_val:
        final_metrics["val_loss_start"] = first_val["val_loss"]
    return _finish(run_dir, dist, tracker, metrics_path, pos.step, final_metrics, data.report)


def _validate(cfg: TrainConfig, parts: RunParts, val, tracker, say, at_step: int) -> dict[str, float]:
    """The held-out losses (with the captions, then with the null caption), logged at ``at_step``; {} without a held-out set."""
    scores = validation_losses(unwrap(parts.model), parts.scheduler, cfg.objective, val, cfg.val_timesteps, cfg.seed)
    if scores:
        null = validation_losses(unwrap(parts.model), parts.scheduler, cfg.objective, val, cfg.val_timesteps, cfg.seed, null_caption=True)
        scores["val_loss_null_caption"] = null["val_loss"]
        tracker.log_metrics(scores, at_step)
        say(f"step {at_step}: val_loss {scores['val_loss']:.4f} (null caption {scores['val_loss_null_caption']:.4f})")
    return scores


def _encode(batch, data: RunData, parts: RunParts, dist: Dist, gen: torch.Generator) -> dict:
    """The batch as the model takes it: from the encoder cache, else through the frozen encoders."""
    if data.cache_dir is not None:
        from training.cached_data import cached_batch_to_device

        return cached_batch_to_device(batch, dist.device, generator=gen, vae_dtype=data.manifest.noise_dtype)
    return encode_batch(batch, parts.text_encoder, parts.vae, dist.device, generator=gen)


def _log_step(cfg: TrainConfig, dist: Dist, say, tracker, window, metrics_path: Path, model_config, pos: Position, enc: dict,
              loss: torch.Tensor, grad_norm: float | None, lr: float) -> float:
    """Metrics of the step just trained: the loss averaged over ranks, per bucket, throughput (samples, tokens, model FLOPs,
    MFU); a line of ``metrics.jsonl`` on rank 0. Returns the averaged loss."""
    reduced = loss.detach().float().clone()
    if dist.world_size > 1:
        torch.distributed.all_reduce(reduced)
        reduced /= dist.world_size
    text_tokens = float(enc["mask"].sum()) / enc["mask"].shape[0] if enc.get("mask") is not None else None
    window.add(model_config, tuple(enc["x"].shape), text_tokens, replicas=dist.world_size)
    metrics = {"loss": float(reduced), f"loss/{bucket_name(enc['model_kwargs'])}": float(loss.detach()), "lr": lr, "epoch": pos.epoch}
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    if dist.is_main:
        with metrics_path.open("a") as f:
            f.write(json.dumps({"step": pos.step, "loss": float(reduced), "rank0_loss": float(loss.detach()), "bucket": bucket_name(enc["model_kwargs"])}) + "\n")
    if pos.step % cfg.log_every == 0 or pos.step == cfg.steps:
        metrics.update(window.report())
        say(f"step {pos.step}/{cfg.steps} loss {float(reduced):.4f} ({bucket_name(enc['model_kwargs'])})")
        report_progress(pos.step, cfg.steps, float(reduced))
    tracker.log_metrics(metrics, pos.step)
    return float(reduced)


def _save_checkpoint(cfg: TrainConfig, run_dir: Path, dist: Dist, lease, data: RunData, parts: RunParts, tracker, pos: Position) -> Path:
    """Checkpoint step ``pos.step`` with the sampler's position, unless this process has lost the run's lease."""
    from training import checkpoint as ckpt, runs

    lost = None
    if lease is not None:
        try:
            lease.check()
        except runs.LeaseLost as err:
            lost = str(err)
    state = {
        "step": pos.step, "epoch": pos.epoch, "sampler": data.sampler.state_dict(num_steps=pos.epoch_step),
        "objective": cfg.objective, "dataset_version": data.version, "dataset_path": str(data.path),
        "mlflow_run_id": tracker.run_id, "model_config": parts.model_config.to_dict(), "config": cfg.model_dump(mode="json"),
        "encoders": parts.encoder_paths, "world_size": dist.world_size, "lease_lost": lost,
    }
    state = broadcast_object(state, dist)  # every rank needs the same state; rank 0's run id is the one that counts
    lost = state.pop("lease_lost")
    if lost:
        raise runs.LeaseLost(f"{lost}: stopping before writing step {pos.step}, so that two trainings never write "
                             "one run folder")
    return ckpt.save_checkpoint(
        outdir=run_dir, step=pos.step, booster=parts.booster, model=parts.model, optimizer=parts.optimizer, ema=parts.ema,
        ema_config=parts.model_config, state=state, rank=dist.rank, barrier=dist.barrier, keep_last=cfg.keep_last,
        sharded_optimizer=parts.use_zero,
    )


def _finish(run_dir: Path, dist: Dist, tracker, metrics_path: Path, steps: int, final_metrics: dict[str, float], report) -> TrainResult:
    """The loss curve and final metrics in the run folder (rank 0), the MLflow run ended, the result every rank returns."""
    from training import checkpoint_folders as folders

    final = folders.latest_checkpoint(run_dir)
    if dist.is_main:
        plot_loss_curve(metrics_path, run_dir / "loss_curve.png")
        tracker.log_artifact(run_dir / "loss_curve.png")
        (run_dir / "final_metrics.json").write_text(json.dumps(final_metrics, indent=2))
    not_logged = tracker.end()
    result = TrainResult(
        outdir=str(run_dir), final_checkpoint=str(final), steps=steps, mlflow_run_id=tracker.run_id,
        mlflow_run_url=tracker.run_url, metrics=final_metrics, bucket_report=report.to_dict(), mlflow_not_logged=not_logged,
    )
    dist.barrier()
    return result


def _step_of_record(line: str, up_to: int) -> bool:
    """Whether a ``metrics.jsonl`` line is a whole record of a step <= ``up_to`` (a kill can cut the last line)."""
    try:
        return int(json.loads(line)["step"]) <= up_to
    except (ValueError, KeyError, TypeError):
        return False




def plot_loss_curve(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.is_file():
        return
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# Dagster Pipes (rank 0 only) and the command line
# --------------------------------------------------------------------------------------------------------------
_PIPES = None


def report_progress(step: int, total: int, loss: float) -> None:
    if _PIPES is not None:
        _PIPES.log.info(f"step {step}/{total} loss {loss:.4f}")


def main(argv: list[str] | None = None) -> int:
    """``python -m training.train``: what each torchrun worker runs; the arguments of ``opensora-dag train``."""
    parser = argparse.ArgumentParser(prog="opensora-dag train", description=TRAIN_DESCRIPTION)
    add_train_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """``opensora-dag train``: with ``--nproc N`` (outside torchrun) start N workers on this machine, else train."""
    global _PIPES
    if args.nproc and "LOCAL_RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "training.train",
               *train_worker_argv(args)]
        return subprocess.call(cmd)

    from common.storage import opensora_home
    from training.config import load_train_config

    overrides = list(args.overrides)
    for flag, key in (("steps", "steps"), ("ckpt_every", "ckpt_every"), ("objective", "objective")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.config_json:  # validated in Dagster before any process started; validated again here, never patched
        from training.config import TrainConfig

        if overrides:
            print("error: --config-json is the whole config; give no --set/--steps/--ckpt-every/--objective with it",
                  file=sys.stderr)
            return 2
        cfg = TrainConfig.model_validate_json(args.config_json)
    else:
        cfg = load_train_config(args.preset, overrides)
    outdir = args.outdir or str(opensora_home() / "checkpoints" / cfg.name)

    rank = int(os.environ.get("RANK", "0"))
    pipes_cm = contextlib.nullcontext()
    if rank == 0 and os.environ.get("DAGSTER_PIPES_CONTEXT"):
        from dagster_pipes import open_dagster_pipes

        pipes_cm = open_dagster_pipes()
    from training.runs import LeaseLost, ResumeError

    try:
        with pipes_cm as pipes:  # an error inside reaches Dagster through pipes too
            _PIPES = pipes
            result = train(cfg, args.dataset, outdir, resume=args.resume, tracking_uri=args.tracking_uri)
            if pipes is not None:
                _report_materialization(pipes, result, cfg.objective)
    except (ResumeError, LeaseLost) as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 2
    if rank == 0:
        print(json.dumps({"final_checkpoint": result.final_checkpoint, "run_dir": result.outdir,
                          "mlflow_run_id": result.mlflow_run_id, "mlflow_not_logged": result.mlflow_not_logged,
                          "metrics": result.metrics}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _report_materialization(pipes, result: TrainResult, objective: str) -> None:
    """Rank 0's materialization of ``trained_model``: the checkpoint, its run folder, MLflow, the metrics."""
    metadata = {
        "final_checkpoint": {"raw_value": result.final_checkpoint, "type": "path"},
        "run_dir": {"raw_value": result.outdir, "type": "path"},
        "mlflow_run_id": result.mlflow_run_id or "",
        "mlflow_run_url": result.mlflow_run_url or "",
        "steps": result.steps,
        "objective": objective,
        **{k.replace("/", "."): {"raw_value": v, "type": "float"} for k, v in result.metrics.items()},
    }
    if result.mlflow_not_logged:
        metadata["mlflow_not_logged"] = result.mlflow_not_logged
    pipes.report_asset_materialization(
        metadata=metadata, data_version=f"{Path(result.outdir).name}/{Path(result.final_checkpoint).name}",
    )


if __name__ == "__main__":
    sys.exit(main())
