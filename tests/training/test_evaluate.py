"""Evaluation library: video metrics with known answers, skipped metrics, prompt-set versions, the MLflow registry,
and the held-out validation loss plus sampling of a tiny checkpoint made offline."""

import json
from pathlib import Path

import numpy as np
import pytest

from training import eval_report, prompt_sets, video_metrics
from training import evaluate as ev
from training import registry

# --------------------------------------------------------------------------------------------------------------
# A tiny training checkpoint made offline (also used by tests/dagster/test_evaluation.py)
# --------------------------------------------------------------------------------------------------------------
TINY_OVERRIDES = {
    "model.overrides": {"input_sq_size": 64, "hidden_size": 48, "depth": 1, "num_heads": 4, "class_dropout_prob": 0.1},
    "encoders.model_max_length": 16,
    "data.val_fraction": 0.5,
    "val_max_samples": 4,
    "val_timesteps": 2,
    "objective": "iddpm",  # the tests sample with DPM-Solver (the demo preset itself trains rectified flow)
}


def make_tiny_dataset(folder: Path, num_clips: int = 6) -> Path:
    """Synthetic clips (moving / static / text) at 96x64, 20 frames: t=8 fits the demo_cpu 64px bucket."""
    import polars as pl

    from curation.samples import PALETTE, Shot, write_synthetic_video

    folder.mkdir(parents=True, exist_ok=True)
    kinds = [("moving", ""), ("static", ""), ("text", "OPEN SORA")]
    rows = []
    for i in range(num_clips):
        kind, text = kinds[i % len(kinds)]
        shot = Shot(kind, 20, PALETTE[i % len(PALETTE)], text=text)
        video = write_synthetic_video(folder / f"clip_{i:02d}.mp4", [shot], width=96, height=64, fps=24)
        rows.append({"id": f"clip{i:02d}", "path": str(video.path), "text": shot.caption(), "num_frames": 20,
                     "height": 64, "width": 96, "fps": 24.0})
    path = folder / "data.parquet"
    pl.DataFrame(rows).write_parquet(path)
    return path


def make_tiny_checkpoint(root: Path, step: int = 1, seed: int = 0, dataset: Path | None = None,
                         mlflow_run_id: str | None = None) -> Path:
    """A ``step-N/`` folder as training writes it (ema/ + state.json), with random weights drawn from ``seed``.

    Only the parts evaluation reads are written (no booster shards or optimizer state).
    """
    import torch

    from models.checkpoint_io import save_stdit2_hf_dir
    from models.tiny import build_tiny_t5, build_tiny_vae
    from training.config import load_train_config
    from training.build import build_model

    t5, vae = root / "tiny-t5", root / "tiny-vae"
    if not (t5 / "config.json").is_file():
        build_tiny_t5(t5)
    if not (vae / "config.json").is_file():
        build_tiny_vae(vae)
    dataset = dataset or root / "dataset" / "data.parquet"
    if not dataset.is_file():
        make_tiny_dataset(dataset.parent)
    cfg = load_train_config("demo-cpu", dict(TINY_OVERRIDES))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, model_config = build_model(cfg, caption_channels=32)  # tiny T5 d_model
        with torch.no_grad():  # a fresh STDiT2 predicts exactly 0 (zero-init output layers): make seeds matter
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    step_dir = root / "run" / f"step-{step:08d}"
    save_stdit2_hf_dir(model, model_config, step_dir / "ema")
    state = {"step": step, "epoch": 0, "objective": cfg.objective, "dataset_version": "tiny-v1",
             "dataset_path": str(dataset), "mlflow_run_id": mlflow_run_id, "model_config": model_config.to_dict(),
             "config": cfg.model_dump(mode="json"), "encoders": {"text_encoder": str(t5), "vae": str(vae)}, "world_size": 1}
    (step_dir / "state.json").write_text(json.dumps(state, indent=2))
    return step_dir


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


# --------------------------------------------------------------------------------------------------------------
# Video metrics with known answers
# --------------------------------------------------------------------------------------------------------------
def textured_frame(h: int = 160, w: int = 288, seed: int = 0) -> np.ndarray:
    import cv2

    noise = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (5, 5), 0)


def test_temporal_flicker_matches_a_hand_computation():
    levels = [0, 10, 30, 25]  # consecutive |differences| 10, 20, 5 -> mean 35/3
    video = np.stack([np.full((4, 6, 3), v, dtype=np.uint8) for v in levels])
    assert video_metrics.temporal_flicker(video) == pytest.approx(35 / 3)
    assert video_metrics.flicker_score(video_metrics.temporal_flicker(video)) == pytest.approx((255 - 35 / 3) / 255)

    rng = np.random.default_rng(1)
    noisy = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    by_hand = np.mean([np.abs(noisy[t + 1].astype(int) - noisy[t].astype(int)).mean() for t in range(4)])
    assert video_metrics.temporal_flicker(noisy) == pytest.approx(by_hand)  # no uint8 wrap-around


def test_static_video_has_no_flicker_and_no_motion():
    still = np.stack([textured_frame()] * 31)
    assert video_metrics.temporal_flicker(still) == 0.0
    assert video_metrics.motion(still) == pytest.approx(0.0, abs=1e-3)


def test_moving_video_has_motion_and_flicker():
    frame = textured_frame()
    moving = np.stack([np.roll(frame, t, axis=1) for t in range(31)])  # 1 px/frame to the right
    # Frames 0/10/20/30: 10 px per pair at width 288 = 20 px at the flow width 576; "abs" averages |u| and |v|.
    assert video_metrics.motion(moving) == pytest.approx(10.0, rel=0.05)
    assert video_metrics.temporal_flicker(moving) > 5.0
    # A short generated video (8 frames) uses evenly spaced frames 0, 2, 5, 7: shifts 2, 3, 2 px.
    assert video_metrics.motion_frame_indices(8) == [0, 2, 5, 7]
    assert video_metrics.motion(moving[:8]) == pytest.approx((2 + 3 + 2) / 3, rel=0.05)


def test_motion_frame_indices_follow_the_reference_where_frames_exist():
    assert video_metrics.motion_frame_indices(31) == [0, 10, 20, 30]
    assert video_metrics.motion_frame_indices(16) == [0, 10]
    assert video_metrics.motion_frame_indices(2) == [0, 1]
    with pytest.raises(ValueError):
        video_metrics.motion_frame_indices(1)


def test_metrics_reject_non_video_input():
    with pytest.raises(ValueError, match="uint8 video"):
        video_metrics.temporal_flicker(np.zeros((4, 8, 8, 3), dtype=np.float32))


# --------------------------------------------------------------------------------------------------------------
# Weights: skipped with the reason when absent, never computed from random weights
# --------------------------------------------------------------------------------------------------------------
def test_clip_and_aesthetic_are_skipped_without_weights(tmp_path):
    videos = [np.zeros((4, 16, 16, 3), dtype=np.uint8)]
    unset = video_metrics.clip_score(videos, ["a prompt"], None)
    assert unset.skipped and unset.value is None and "not set" in unset.skipped_reason

    missing = tmp_path / "no-clip.pt"
    absent = video_metrics.clip_score(videos, ["a prompt"], missing)
    assert absent.skipped and str(missing) in absent.skipped_reason

    aes = video_metrics.aesthetic(videos, missing, tmp_path / "no-mlp.pth")
    assert aes.skipped and "no-mlp.pth" in aes.skipped_reason  # the MLP is checked first: no CLIP is built


def test_clip_score_runs_when_weights_are_local(tmp_path):
    """With local weights (a tiny random CLIP here) each video's score is 100 x cos(image, text) averaged over its
    evenly spaced frames, checked against open_clip called directly (not through our scorer)."""
    import open_clip
    import torch
    from PIL import Image

    from models.scorers.clip_backbone import build_tiny_clip

    build_tiny_clip(tmp_path / "clip")
    videos = [np.stack([textured_frame(64, 96, 3 * v + k) for k in range(10)]) for v in range(2)]
    prompts = ["a cat", "a dog"]
    result = video_metrics.clip_score(videos, prompts, tmp_path / "clip", device="cpu")
    assert not result.skipped and len(result.values) == 2

    name = f"local-dir:{tmp_path / 'clip'}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device="cpu")
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    expected = []
    with torch.no_grad():
        for video, prompt in zip(videos, prompts):
            frames = [video[i] for i in (0, 1, 3, 4, 5, 6, 8, 9)]  # 8 of 10, evenly spaced (rounded linspace)
            image = model.encode_image(torch.stack([preprocess(Image.fromarray(f)) for f in frames]))
            text = model.encode_text(tokenizer([prompt]))
            cos = torch.nn.functional.cosine_similarity(image, text.expand_as(image))
            expected.append(float((100 * cos).mean()))  # no clamp: the reference match score is 100 x cos
    np.testing.assert_allclose(result.values, expected, rtol=1e-4, atol=1e-4)
    assert len(set(np.round(result.values, 4))) == 2  # two different videos, two different scores
    assert result.value == pytest.approx(np.mean(expected), rel=1e-4)
    aes = video_metrics.aesthetic(videos, tmp_path / "clip", tmp_path / "missing-mlp.pth", device="cpu")
    assert aes.skipped and "aesthetic MLP weights not found" in aes.skipped_reason


def test_vbench_is_skipped_with_the_folder_it_looked_in(tmp_path):
    result = video_metrics.run_vbench({}, tmp_path / "out", weights_dir=tmp_path / "vbench-weights")
    assert result["vbench"].skipped
    assert result["vbench"].skipped_reason == f"skipped: weights not found at {tmp_path / 'vbench-weights'}"


# --------------------------------------------------------------------------------------------------------------
# Prompt sets
# --------------------------------------------------------------------------------------------------------------
def test_packaged_prompt_set_is_stable_and_holds_the_demo_prompts():
    first, again = prompt_sets.load_prompt_set("v1"), prompt_sets.load_prompt_set("v1")
    assert first.version == again.version and first.version.startswith("v1-") and len(first.version) == 11
    assert "a red circle and a yellow square moving quickly across a plain coloured background" in first.prompts
    assert 'a still title card with the words "OPEN SORA 2024" written in large white letters' in first.prompts
    assert len(first) >= 8 and not any(p.startswith("#") for p in first.prompts)


def test_prompt_set_version_changes_with_the_prompts_not_the_comments(tmp_path):
    base = tmp_path / "eval_prompts_x.txt"
    base.write_text("# a comment\na cat\n\na dog\n")
    commented = tmp_path / "b" / "eval_prompts_x.txt"
    commented.parent.mkdir()
    commented.write_text("# another comment\na cat\na dog\n# trailing\n")
    edited = tmp_path / "c" / "eval_prompts_x.txt"
    edited.parent.mkdir()
    edited.write_text("a cat\na horse\n")
    v = {p: prompt_sets.load_prompt_set(str(p)) for p in (base, commented, edited)}
    assert v[base].prompts == ("a cat", "a dog") and v[base].name == "x"
    assert v[base].version == v[commented].version
    assert v[base].version != v[edited].version
    with pytest.raises(ValueError, match="unknown prompt set"):
        prompt_sets.load_prompt_set("no-such-set")


# --------------------------------------------------------------------------------------------------------------
# MLflow: logging, comparing, registering (a sqlite store under tmp_path)
# --------------------------------------------------------------------------------------------------------------
def fake_report(tmp_path: Path, name: str, val_loss: float | None, run_id: str | None = None) -> eval_report.EvaluationReport:
    ckpt = tmp_path / "run" / name
    (ckpt / "ema").mkdir(parents=True)
    (ckpt / "ema" / "config.json").write_text(json.dumps({"hidden_size": 8, "depth": 1}))
    (ckpt / "ema" / "model.safetensors").write_bytes(b"weights of " + name.encode())
    out = tmp_path / "eval" / name
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "00-a-cat.gif").write_bytes(b"GIF89a")
    metrics = {"temporal_flicker": 3.0, "val_loss/8x64x96": val_loss} if val_loss is not None else {"temporal_flicker": 3.0}
    if val_loss is not None:
        metrics["val_loss"] = val_loss
    report = eval_report.EvaluationReport(checkpoint=str(ckpt), step=int(name.split("-")[1]), objective="iddpm",
                                          dataset_version="tiny-v1", mlflow_run_id=run_id, prompt_set="v1-abc", settings={},
                                          metrics=metrics, skipped={"clip_score": "CLIP score skipped: CLIP checkpoint path is not set"},
                                          out_dir=str(out))
    report.save()
    return report


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One sqlite store for the module (creating one costs seconds); each test uses its own model name."""
    folder = tmp_path_factory.mktemp("mlruns")
    return f"sqlite:///{folder / 'mlflow.db'}"


def test_compare_to_best_passes_until_a_registered_version_is_better(tmp_path, tracking_uri):
    name = "compare"
    assert registry.compare_to_best(5.0, tracking_uri, name) == (True, None)  # nothing registered yet
    decision = registry.register_if_best(fake_report(tmp_path, "step-00000001", 1.0), tracking_uri, name)
    assert decision.is_best and decision.version == "1" and decision.best_val_loss_before is None

    assert registry.compare_to_best(0.9, tracking_uri, name) == (True, 1.0)
    assert registry.compare_to_best(1.0, tracking_uri, name) == (True, 1.0)  # equal is not worse
    assert registry.compare_to_best(1.0 + 1e-12, tracking_uri, name) == (True, 1.0)  # float noise of a re-evaluation
    assert registry.compare_to_best(1.2, tracking_uri, name) == (False, 1.0)
    assert registry.compare_to_best(None, tracking_uri, name) == (False, 1.0)  # not validated: not shown to be no worse


def test_register_if_best_moves_the_alias_only_on_improvement(tmp_path, tracking_uri):
    import mlflow

    name = "register"
    first = registry.register_if_best(fake_report(tmp_path, "step-00000001", 1.0), tracking_uri, name)
    assert first.is_best and first.version == "1"
    worse = registry.register_if_best(fake_report(tmp_path, "step-00000002", 1.2), tracking_uri, name)
    assert not worse.is_best and worse.version is None and worse.best_val_loss_before == 1.0
    assert first.not_worse and not worse.not_worse  # the check's verdict, from the same query as the decision
    unvalidated = registry.register_if_best(fake_report(tmp_path, "step-00000003", None), tracking_uri, name)
    assert not unvalidated.is_best and "no val_loss" in unvalidated.reason
    better = registry.register_if_best(fake_report(tmp_path, "step-00000004", 0.9), tracking_uri, name)
    assert better.is_best and better.version == "2" and better.best_val_loss_before == 1.0
    again = registry.register_if_best(fake_report(tmp_path / "again", "step-00000004", 0.9 - 1e-12), tracking_uri, name)
    assert not again.is_best and again.version is None  # float noise is no improvement

    client = mlflow.MlflowClient(tracking_uri)
    best = client.get_model_version_by_alias(name, "best")
    assert str(best.version) == "2" and float(best.tags["val_loss"]) == 0.9
    assert best.tags["checkpoint"].endswith("step-00000004") and best.tags["prompt_set"] == "v1-abc"
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'")) == ["1", "2"]
    # The version's source holds the EMA folder itself.
    local = mlflow.artifacts.download_artifacts(best.source, dst_path=str(tmp_path / "dl"), tracking_uri=tracking_uri)
    assert (Path(local) / "model.safetensors").read_bytes() == b"weights of step-00000004"
    assert registry.compare_to_best(0.95, tracking_uri, name) == (False, 0.9)


def test_log_to_mlflow_writes_metrics_skips_and_previews_to_the_training_run(tmp_path, tracking_uri):
    import mlflow

    from training.tracking import ensure_experiment

    client = mlflow.MlflowClient(tracking_uri)
    run = client.create_run(ensure_experiment(tracking_uri))
    client.set_terminated(run.info.run_id)  # training finished long ago: evaluation still logs to its run
    report = fake_report(tmp_path, "step-00000007", 0.5, run_id=run.info.run_id)
    assert eval_report.log_to_mlflow(report, tracking_uri) == run.info.run_id

    logged = client.get_run(run.info.run_id)
    assert logged.data.metrics["eval/val_loss"] == 0.5 and logged.data.metrics["eval/temporal_flicker"] == 3.0
    assert "eval/val_loss/8x64x96" in logged.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/val_loss")] == [7]
    assert logged.data.tags["eval.skipped.clip_score"].startswith("CLIP score skipped")
    assert logged.data.tags["eval.prompt_set"] == "v1-abc"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "eval/step-00000007")}
    assert {"eval/step-00000007/report.json", "eval/step-00000007/samples"} <= files


def test_without_a_training_run_one_evaluation_run_is_made(tmp_path, tracking_uri):
    import mlflow

    report = fake_report(tmp_path, "step-00000003", 0.7)
    decision = registry.register_if_best(report, tracking_uri, "no-run")
    run_id = eval_report.log_to_mlflow(report, tracking_uri)
    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.run_name == "eval-step-00000003" and run.data.metrics["eval/val_loss"] == 0.7
    version = mlflow.MlflowClient(tracking_uri).get_model_version("no-run", decision.version)
    assert version.run_id == run_id  # registration and logging share the run


# --------------------------------------------------------------------------------------------------------------
# A tiny checkpoint: validation loss on the held-out split, and the whole evaluation
# --------------------------------------------------------------------------------------------------------------
def test_validation_loss_is_per_bucket_and_deterministic(tiny_checkpoint):
    first = ev.validation_loss(tiny_checkpoint)
    assert isinstance(first, dict), first
    buckets = [k for k in first if k.startswith("val_loss/")]
    assert buckets and all(np.isfinite(v) and v > 0 for v in first.values())
    assert ev.validation_loss(tiny_checkpoint) == first  # fixed timesteps and noise


def test_validation_loss_is_skipped_when_the_dataset_is_gone(tiny_checkpoint, tmp_path):
    import shutil

    moved = tmp_path / "step-00000001"
    shutil.copytree(tiny_checkpoint, moved)
    state = json.loads((moved / "state.json").read_text())
    state["dataset_path"] = str(tmp_path / "gone.parquet")
    (moved / "state.json").write_text(json.dumps(state))
    result = ev.validation_loss(moved)
    assert isinstance(result, video_metrics.MetricResult) and result.skipped and "gone.parquet" in result.skipped_reason


def test_evaluate_checkpoint_end_to_end(tiny_checkpoint, tmp_path):
    prompts = prompt_sets.PromptSet("t", "t-0", ("a red circle and a yellow square moving quickly", "a cat on a sofa"))
    report = ev.evaluate_checkpoint(tiny_checkpoint, prompts, tmp_path / "eval", num_frames=8, image_size=(32, 48),
                                    steps=3, scheduler="dpm-solver", device="cpu", vbench_dir=tmp_path / "nope",
                                    log=lambda _: None)
    assert report.step == 1 and report.prompt_set == "t-0" and len(report.samples) == 2
    for sample in report.samples:
        assert Path(sample.files["mp4"]).is_file() and Path(sample.files["gif"]).is_file()
        assert sample.metrics["temporal_flicker"] >= 0 and sample.metrics["motion"] >= 0
    assert {"temporal_flicker", "temporal_flicker_score", "motion", "val_loss"} <= set(report.metrics)
    assert report.metrics["val_loss"] == ev.validation_loss(tiny_checkpoint)["val_loss"]  # the EMA, in fp32
    assert set(report.skipped) == {"clip_score", "aesthetic", "vbench"}
    assert "CLIP checkpoint path is not set" in report.skipped["clip_score"]
    # Prompt adherence with both controls: the shuffled prompts and the untrained (step-0) model, per criterion too;
    # the second prompt names nothing measurable and has no score.
    assert {"prompt_adherence", "prompt_adherence_shuffled", "prompt_adherence_step0",
            "prompt_adherence/colour", "prompt_adherence_step0/colour"} <= set(report.metrics)
    assert report.samples[0].metrics["prompt_adherence_step0"] is not None
    assert report.samples[1].metrics["prompt_adherence_step0"] is None
    assert report.ranked_by == "prompt_adherence"  # no CLIP weights: the registry ranks by adherence
    assert report.settings["scheduler"] == "dpm-solver" and report.settings["steps"] == 3
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["metrics"] == report.metrics and saved["samples"][0]["prompt"] == prompts.prompts[0]


# --------------------------------------------------------------------------------------------------------------
# Registry cohorts, demo model names, evaluation shape
# --------------------------------------------------------------------------------------------------------------
def cohort_report(tmp_path, name: str, val_loss: float, dataset_version: str = "tiny-v1", preset: str = "stage1",
                  objective: str = "iddpm") -> eval_report.EvaluationReport:
    report = fake_report(tmp_path / dataset_version / preset / objective, name, val_loss)
    report.dataset_version, report.preset, report.objective = dataset_version, preset, objective
    return report


def test_registry_compares_only_checkpoints_of_the_same_dataset_preset_and_objective(tmp_path, tracking_uri):
    name = "cohorts"
    assert registry.register_if_best(cohort_report(tmp_path, "step-00000001", 1.0), tracking_uri, name).is_best
    # another dataset version, preset or objective: never "worse" than a loss it cannot be compared with
    for other in ({"dataset_version": "tiny-v2"}, {"preset": "stage2"}, {"objective": "rflow"}):
        decision = registry.register_if_best(cohort_report(tmp_path, "step-00000002", 5.0, **other), tracking_uri, name)
        assert decision.is_best and decision.best_val_loss_before is None, (other, decision.reason)
    # within the cohort the usual rule holds
    worse = registry.register_if_best(cohort_report(tmp_path, "step-00000003", 1.5), tracking_uri, name)
    assert not worse.is_best and worse.best_val_loss_before == 1.0
    cohort = cohort_report(tmp_path, "step-00000004", 0.0).cohort
    assert registry.compare_to_best(1.2, tracking_uri, name, cohort=cohort) == (False, 1.0)
    assert registry.compare_to_best(4.0, tracking_uri, name, cohort={**cohort, "objective": "rflow"}) == (True, 5.0)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias(name, registry.cohort_alias(cohort))
    assert version.tags["val_loss"] == "1.0" and version.tags["preset"] == "stage1"


def test_demo_checkpoints_register_under_their_own_model_name():
    demo = {"config": {"encoders": {"text_encoder": None, "vae": None, "build_tiny_if_missing": True}}}
    real = {"config": {"encoders": {"text_encoder": "/models/t5", "vae": "/models/sd-vae"}}}
    assert registry.registry_model_name("opensora-stdit2", demo) == "opensora-stdit2-demo"
    assert registry.registry_model_name("opensora-stdit2", real) == "opensora-stdit2"
    with pytest.raises(ValueError):
        registry.best_version("sqlite:///unused.db", "x' or name != '")


def test_evaluation_samples_at_the_trained_presets_resolution():
    assert ev.evaluation_shape({"data": {"bucket_preset": "demo_cpu"}}) == (8, (96, 160))
    assert ev.evaluation_shape({"data": {"bucket_preset": "stage1"}}) == (32, (240, 426))


def test_the_experiment_opens_as_model_training_not_genai(tmp_path):
    import mlflow

    from training.tracking import EXPERIMENT_TAGS, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    assert client.get_experiment(ensure_experiment(uri, "fresh")).tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment("made-before")  # an experiment created by an earlier version: no kind tag
    assert ensure_experiment(uri, "made-before") == old
    assert client.get_experiment(old).tags.get("mlflow.experimentKind") == EXPERIMENT_TAGS["mlflow.experimentKind"]


def test_untrained_model_is_the_runs_starting_point_not_the_checkpoint(tiny_checkpoint):
    import torch

    from models.stdit2 import STDiT2

    trained = ev.load_ema_model(tiny_checkpoint)
    step0 = ev.untrained_model(tiny_checkpoint, trained)
    seed = json.loads((tiny_checkpoint / "state.json").read_text())["config"]["seed"]
    torch.manual_seed(seed)
    fresh = STDiT2(trained.config).state_dict()
    weights, trained_weights = step0.state_dict(), trained.state_dict()
    assert weights.keys() == trained_weights.keys() == fresh.keys()
    assert all(torch.equal(weights[k], fresh[k]) for k in weights)  # the seed's initialisation, exactly
    assert any(not torch.equal(weights[k], trained_weights[k]) for k in weights)  # not the trained weights
    assert not step0.training and not any(p.requires_grad for p in step0.parameters())


def adherence_report(tmp_path, name: str, adherence: float, val_loss: float = 1.0, prompt_set: str = "world-abc",
                     clip: float | None = None) -> eval_report.EvaluationReport:
    report = fake_report(tmp_path / prompt_set / str(clip), name, val_loss)
    report.prompt_set = prompt_set
    report.metrics.update(prompt_adherence=adherence, prompt_adherence_shuffled=0.1, prompt_adherence_step0=0.05)
    if clip is not None:
        report.metrics["clip_score"] = clip
        report.skipped.pop("clip_score")
    return report


def test_without_clip_weights_the_registry_ranks_by_prompt_adherence(tmp_path, tracking_uri):
    name = "adherence"
    first = adherence_report(tmp_path, "step-00000001", 0.5, val_loss=1.0)
    assert first.ranked_by == "prompt_adherence" and first.cohort["prompt_set"] == "world-abc"
    decision = registry.register_if_best(first, tracking_uri, name)
    assert decision.is_best and decision.ranked_by == "prompt_adherence" and decision.best_before is None
    # A lower val_loss does not make a checkpoint better when it follows its prompts less (and vice versa).
    worse = registry.register_if_best(adherence_report(tmp_path, "step-00000002", 0.4, val_loss=0.5), tracking_uri, name)
    assert not worse.is_best and worse.best_before == 0.5 and "not above" in worse.reason
    better = registry.register_if_best(adherence_report(tmp_path, "step-00000003", 0.7, val_loss=2.0), tracking_uri, name)
    assert better.is_best and better.best_before == 0.5 and better.best_val_loss_before is None
    cohort = adherence_report(tmp_path / "c", "step-00000009", 0.0).cohort
    assert registry.compare_to_best(0.7, tracking_uri, name, cohort=cohort) == (True, 0.7)  # equal is not worse
    assert registry.compare_to_best(0.69, tracking_uri, name, cohort=cohort) == (False, 0.7)
    assert registry.compare_to_best(None, tracking_uri, name, cohort=cohort) == (False, 0.7)
    # Another prompt set is another exam: nothing comparable registered yet.
    other = registry.register_if_best(adherence_report(tmp_path, "step-00000004", 0.1, prompt_set="v1-abc"), tracking_uri, name)
    assert other.is_best and other.best_before is None
    # Versions ranked by val_loss are never compared with adherence-ranked ones (and the reverse).
    by_loss = registry.register_if_best(fake_report(tmp_path / "loss", "step-00000005", 9.0), tracking_uri, name)
    assert by_loss.is_best and by_loss.best_val_loss_before is None

    import mlflow

    best = mlflow.MlflowClient(tracking_uri).get_model_version_by_alias(name, registry.cohort_alias(cohort))
    assert best.tags["ranked_by"] == "prompt_adherence" and float(best.tags["prompt_adherence"]) == 0.7
    assert float(best.tags["val_loss"]) == 2.0 and best.tags["checkpoint"].endswith("step-00000003")


def test_with_clip_weights_the_clip_score_decides(tmp_path, tracking_uri):
    name = "clip-decides"
    first = adherence_report(tmp_path, "step-00000001", 0.9, clip=20.0)
    assert first.ranked_by == "clip_score"
    assert registry.register_if_best(first, tracking_uri, name).is_best
    # Better adherence, lower CLIP score: not registered.
    lower = registry.register_if_best(adherence_report(tmp_path, "step-00000002", 1.0, clip=19.0), tracking_uri, name)
    assert not lower.is_best and lower.best_before == 20.0
    higher = registry.register_if_best(adherence_report(tmp_path, "step-00000003", 0.2, clip=21.0), tracking_uri, name)
    assert higher.is_best and higher.ranked_by == "clip_score"
