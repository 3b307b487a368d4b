"""The data contract of the curation graph (issue 12, items 11-14).

- The CLIP the scorers build from the ModelStore defaults is the QuickGELU ViT-L/14 that OpenAI's weights need.
- Bad input is quarantined and never fails a stage; a component error is quarantined while rare and fails the stage
  with a summary when it hits more than the configured share of the items.
- A missing score fails an active filter criterion; only the spec skips one, and a skip shows as a failed,
  non-blocking check on curated_dataset (the demo skips aes and match: no weights).
- clips_are_valid checks the duration bounds the clips were cut with, not a hard-coded 2..15 s.
"""

from __future__ import annotations

import copy
import errno

import av
import numpy as np
import polars as pl
import pytest
import torch
from dagster import instance_for_test, materialize

from assets.checks import clips_are_valid
from assets.curation import clips, raw_videos, scenes
from assets.datasets import criterion_check_name, curated_dataset
from assets.scoring import aesthetic_scores, match_scores, motion_scores
from curation.errors import InputRejected, is_input_rejection
from curation.filters import CRITERIA
from models.scorers import WeightsUnavailable
from resources.lakehouse import Lakehouse
from resources.model_store import ModelStore

BATCH = "b1"
N_CLIPS = 5


# ---- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture
def lake(tmp_path) -> Lakehouse:
    """A lake holding one batch of N_CLIPS clips (no media: the tests stand in for the kept frames) and captions."""
    lake = Lakehouse(home=str(tmp_path / "home"))
    rows = [{"id": f"c{i}", "video_id": "v0", "path": f"/media/clips/c{i}.mp4", "frames_dir": f"/media/frames/c{i}",
             "num_frames": 60, "fps": 30.0, "height": 64, "width": 64, "start_frame": 60 * i, "end_frame": 60 * i + 60}
            for i in range(N_CLIPS)]  # fmt: skip
    lake.write_partition("clips", BATCH, pl.DataFrame(rows))
    captions = pl.DataFrame({"id": [r["id"] for r in rows], "text": [f"a clip number {i}" for i in range(N_CLIPS)],
                             "source": ["sidecar"] * N_CLIPS, "reason": [None] * N_CLIPS},
                            schema_overrides={"reason": pl.String})  # fmt: skip
    lake.write_partition("captions", BATCH, captions)
    return lake


@pytest.fixture
def instance():
    with instance_for_test() as inst:
        inst.add_dynamic_partitions("video_batches", [BATCH])
        yield inst


@pytest.fixture
def frames(monkeypatch):
    """Kept frames without media: clip id -> what loading its frames does (frames, or an exception to raise)."""
    from curation.kept_frames import PURPOSE_ALIASES, KeepFramesSpec

    behaviour: dict[str, object] = {}
    rng = np.random.default_rng(0)
    kept = KeepFramesSpec().indices(60)  # as many frames per purpose as the cutter keeps for a 60-frame clip

    def load_kept_frames(frames_dir, purpose):
        what = behaviour.get(str(frames_dir).rsplit("/", 1)[-1])
        if isinstance(what, BaseException):
            raise what
        count = len(kept[PURPOSE_ALIASES.get(purpose, purpose)])
        return [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(count)]

    monkeypatch.setattr("curation.kept_frames.load_kept_frames", load_kept_frames)
    return behaviour


def run(assets, lake, instance, model_store=None, run_config=None, partition_key=BATCH):
    resources = {"lakehouse": lake, "model_store": model_store or ModelStore()}
    return materialize(assets, partition_key=partition_key, instance=instance, resources=resources,
                       run_config=run_config, raise_on_error=False)  # fmt: skip


def failure_of(result) -> str:
    (event,) = [e for e in result.all_events if e.is_step_failure]
    return event.step_failure_data.user_failure_data.description


def quarantine(lake: Lakehouse, stage: str) -> dict[str, str]:
    rows = lake.query(f"SELECT path, reason FROM quarantine WHERE stage = '{stage}'").rows() if "quarantine" in lake.tables() else []
    return dict(rows)


# ---- item 11: the ModelStore's CLIP is QuickGELU -----------------------------------------------------------------
@pytest.fixture
def tiny_weights(tmp_path, monkeypatch):
    """Tiny random CLIP weights + a 64-d aesthetic MLP; every built-in open_clip name builds at tiny size, keeping
    that name's own ``quick_gelu`` flag (so the activation the real architecture would use is what gets built)."""
    import open_clip.factory

    from models.scorers.aesthetic import AestheticMLP
    from models.scorers.clip_backbone import TINY_CLIP_CONFIG, build_tiny_clip

    _, checkpoint = build_tiny_clip(tmp_path / "clip")
    mlp = tmp_path / "mlp.pth"
    torch.save(AestheticMLP(in_dim=64).state_dict(), mlp)
    real = open_clip.factory.get_model_config

    def tiny_config(name):
        config = real(name)
        if config is None:
            return None
        return {**copy.deepcopy(TINY_CLIP_CONFIG), "quick_gelu": bool(config.get("quick_gelu", False))}

    monkeypatch.setattr(open_clip.factory, "get_model_config", tiny_config)
    return {"clip_checkpoint": str(checkpoint), "aesthetic_mlp": str(mlp)}


@pytest.fixture
def built_models(monkeypatch):
    """Every open_clip model a ClipBackbone is made from, in order."""
    from models.scorers import clip_backbone

    built = []
    original = clip_backbone.ClipBackbone.__init__

    def spy(self, model, *args, **kwargs):
        built.append(model)
        original(self, model, *args, **kwargs)

    monkeypatch.setattr(clip_backbone.ClipBackbone, "__init__", spy)
    return built


def activations(model) -> set[str]:
    from open_clip.transformer import QuickGELU

    return {type(m).__name__ for m in model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}


def test_model_store_default_builds_the_quickgelu_clip_for_aes_and_match(lake, instance, frames, tiny_weights, built_models):
    store = ModelStore(**tiny_weights)  # clip_model_name left at its default
    assert store.clip_model_name == "ViT-L-14-quickgelu"
    result = run([aesthetic_scores, match_scores], lake, instance, store)
    assert result.success
    assert len(built_models) == 2  # one CLIP per scorer, both built from the resource's architecture name
    for model in built_models:
        assert activations(model) == {"QuickGELU"}, "OpenAI's ViT-L/14 weights need QuickGELU in every block"
    scores = lake.query("SELECT a.aes, m.match FROM aesthetic_scores a JOIN match_scores m USING (id)")
    assert scores.height == N_CLIPS and scores.null_count().row(0) == (0, 0)

    # The control: the architecture the resource used to default to builds plain GELU blocks from the same weights.
    built_models.clear()
    assert run([aesthetic_scores], lake, instance, ModelStore(**tiny_weights, clip_model_name="ViT-L-14")).success
    assert activations(built_models[0]) == {"GELU"}


# ---- item 12: input rejections vs component errors -------------------------------------------------------------
def test_errors_are_told_apart():
    assert is_input_rejection(InputRejected("2 frames, fewer than the 16 needed"))
    assert is_input_rejection(av.error.InvalidDataError(errno.EINVAL, "Invalid data found when processing input"))
    assert is_input_rejection(FileNotFoundError(2, "No such file", "/media/frames/c0/0.png"))
    assert is_input_rejection(OSError("cannot read kept frame /media/frames/c0/0.png"))
    assert not is_input_rejection(OSError(errno.ENOSPC, "No space left on device"))  # the machine, not the file
    assert not is_input_rejection(ValueError("expected RGB uint8 frames"))
    assert not is_input_rejection(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_input_rejection(WeightsUnavailable("CLIP weights not found at /w/clip.pt"))


def test_input_rejections_are_quarantined_and_never_fail_the_stage(lake, instance, frames):
    frames.update({
        "c0": OSError("cannot read kept frame /media/frames/c0/0.png"),
        "c1": InputRejected("kept frames are empty"),
        "c2": av.error.InvalidDataError(errno.EINVAL, "Invalid data found when processing input"),
        "c3": FileNotFoundError(2, "No such file or directory", "/media/frames/c3"),
    })  # 4 of 5 clips: far above any error share, and still not a failure
    result = run([motion_scores], lake, instance)
    assert result.success
    reasons = quarantine(lake, "motion_scores")
    assert set(reasons) == {f"/media/clips/c{i}.mp4" for i in range(4)}
    assert not any(r.startswith("component error") for r in reasons.values())
    assert reasons["/media/clips/c1.mp4"] == "InputRejected: kept frames are empty"
    flow = dict(lake.query("SELECT id, flow FROM motion_scores").rows())
    assert flow["c4"] is not None and all(flow[f"c{i}"] is None for i in range(4))


def test_component_errors_above_the_share_fail_the_stage_with_a_summary(lake, instance, frames, monkeypatch):
    def broken(frames, backend="dis"):
        raise RuntimeError("flow exploded")

    monkeypatch.setattr("models.scorers.motion.motion_score", broken)
    result = run([motion_scores], lake, instance)
    assert not result.success
    message = failure_of(result)
    assert "motion_scores: 5 of 5 items (100%) raised component errors" in message
    assert "more than the allowed 20%" in message and "5 x RuntimeError: flow exploded" in message
    assert "motion_scores" not in lake.tables() or lake.read_partition("motion_scores", BATCH).is_empty()
    assert quarantine(lake, "motion_scores") == {}  # nothing written: the stage failed as a whole


def test_component_errors_below_the_share_are_quarantined_and_reported(lake, instance, frames, monkeypatch):
    from models.scorers import motion

    real = motion.motion_score
    calls = iter(range(100))

    def flaky(frames, backend="dis"):
        if next(calls) == 0:
            raise ValueError("optical flow returned NaN")
        return real(frames, backend=backend)

    monkeypatch.setattr("models.scorers.motion.motion_score", flaky)
    result = run([motion_scores], lake, instance)
    assert result.success  # 1 of 5 = 20%: not more than the default share
    reasons = quarantine(lake, "motion_scores")
    assert list(reasons.values()) == ["component error: ValueError: optical flow returned NaN"]
    (materialization,) = result.asset_materializations_for_node("motion_scores")
    assert materialization.metadata["num_component_errors"].value == 1
    assert "1 x ValueError: optical flow returned NaN" in materialization.metadata["component_errors"].value
    null_reason = lake.query("SELECT reason FROM motion_scores WHERE flow IS NULL")["reason"].to_list()
    assert null_reason == ["component error: ValueError: optical flow returned NaN"]


def failing_first(k: int):
    """A motion scorer whose first ``k`` calls raise (a component error), then scores 1.0."""
    calls = iter(range(10**6))

    def score(frames, backend="dis"):
        if next(calls) < k:
            raise RuntimeError("boom")
        return 1.0

    return score


def test_the_error_share_is_configurable(lake, instance, frames, monkeypatch):
    monkeypatch.setattr("models.scorers.motion.motion_score", failing_first(2))
    assert not run([motion_scores], lake, instance).success  # 2 of 5 = 40% > the default 20%
    monkeypatch.setattr("models.scorers.motion.motion_score", failing_first(2))
    config = {"ops": {"motion_scores": {"config": {"max_component_error_share": 0.5}}}}
    assert run([motion_scores], lake, instance, run_config=config).success  # 2 of 5 <= 50% (a Config field)

    monkeypatch.setenv("OPENSORA_MAX_COMPONENT_ERROR_SHARE", "0")  # or the environment
    monkeypatch.setattr("models.scorers.motion.motion_score", failing_first(1))
    result = run([motion_scores], lake, instance)
    assert not result.success and "1 of 5 items (20%)" in failure_of(result) and "allowed 0%" in failure_of(result)


# ---- items 12 + 13: missing weights fail the criterion unless the spec skips it ---------------------------------
def checks_of(result) -> dict[str, tuple[bool, str, dict]]:
    return {e.check_name: (e.passed, e.severity.value, {k: v.value for k, v in e.metadata.items()})
            for e in result.get_asset_check_evaluations()}  # fmt: skip


def test_missing_weights_fail_the_criterion_unless_the_spec_skips_it(lake, instance, frames):
    # No weights: aes and match are null with the reason (as before), and the run is green.
    assert run([aesthetic_scores, match_scores, motion_scores], lake, instance).success
    reasons = set(lake.query("SELECT reason FROM aesthetic_scores")["reason"])
    assert reasons == {"CLIP checkpoint path is not set"}

    # A spec that asks for aes >= 5 and does not skip it: every clip fails it, with why, and the check says so.
    strict = run([curated_dataset], lake, instance, partition_key=None,
                 run_config={"ops": {"curated_dataset": {"config": {"aesmin": 5.0, "require_caption": False}}}})
    assert strict.success  # the dataset is built (empty); the failed check is the signal
    (meta,) = [m.metadata for m in strict.asset_materializations_for_node("curated_dataset")]
    assert meta["num_rows"].value == 0 and meta["drop_counts"].value == {"aesmin": N_CLIPS, "duplicate": 0}
    checks = checks_of(strict)
    passed, severity, info = checks[criterion_check_name("aesmin")]
    assert not passed and severity == "ERROR"
    assert "aesthetic_scores.aes is null for all 5 clips: CLIP checkpoint path is not set" in info["reason"]
    assert info["dropped_without_value"] == N_CLIPS

    # The demo's spec skips aes and match on purpose: both checks fail as warnings, the run stays green.
    demo = run([curated_dataset], lake, instance, partition_key=None,
               run_config={"ops": {"curated_dataset": {"config": {"preset": "demo"}}}})
    assert demo.success
    checks = checks_of(demo)
    assert set(checks) == {criterion_check_name(c.name) for c in CRITERIA}
    failed = {name: (severity, info["reason"]) for name, (passed, severity, info) in checks.items() if not passed}
    assert set(failed) == {"aesmin_applied", "matchmin_applied"}
    assert {severity for severity, _ in failed.values()} == {"WARN"}
    assert failed["aesmin_applied"][1].startswith("skipped by the spec")
    assert "CLIP checkpoint path is not set" in failed["matchmin_applied"][1]
    (meta,) = [m.metadata for m in demo.asset_materializations_for_node("curated_dataset")]
    assert meta["num_rows"].value == N_CLIPS


def test_demo_passes_the_demo_spec(monkeypatch, tmp_path):
    """`make demo` materializes curated_dataset with the demo preset (its skips are deliberate, not data-driven)."""
    from opensora_dag import demo, instance as instance_module

    seen = {}

    def fake_materialize(selection, batches, instance, **kwargs):
        seen.update(kwargs)
        return []

    monkeypatch.setattr(instance_module, "materialize_selection", fake_materialize)
    monkeypatch.setattr(instance_module, "get_instance", lambda root: None)
    monkeypatch.setattr("curation.samples.seed_sample_batch", lambda folder: [])
    lake = Lakehouse(home=str(tmp_path / "home"))
    demo.run_demo(lake)
    assert seen["asset_config"]["curated_dataset"] == {"preset": "demo"}


# ---- item 14: clips_are_valid checks the configured bounds --------------------------------------------------------
def test_clips_check_uses_the_bounds_the_clips_were_cut_with(tmp_path, instance):
    from curation.samples import Shot, write_synthetic_video

    lake = Lakehouse(home=str(tmp_path / "home"))
    batch = lake.batch_dir(BATCH)
    batch.mkdir(parents=True)
    write_synthetic_video(batch / "v.mp4", [Shot("moving", 36, (20, 60, 140), speed=5.0),
                                            Shot("static", 96, (200, 120, 30))], width=96, height=64, fps=24)
    config = {"ops": {"clips": {"config": {"min_seconds": 1.0, "max_seconds": 2.0}}}}
    cut = run([raw_videos, scenes, clips, clips_are_valid], lake, instance, run_config=config)
    # The 1.5 s shot is a legal clip under 1..2 s (the old hard-coded 2..15 s check failed it).
    assert cut.success
    seconds = sorted(r / f for r, f in lake.query("SELECT num_frames, fps FROM clips").rows())
    assert seconds == pytest.approx([1.5, 2.0], abs=0.05)
    (passed, _, info) = checks_of(cut)["clips_are_valid"]
    assert passed and info["bounds_s"] == "1..2" and "run config" in info["bounds_from"]

    # A clip longer than those bounds fails the check, also when the check runs later, in another run: the bounds
    # come from the run that materialized the clips, not from the run of the check.
    from types import SimpleNamespace

    from assets.checks import clip_bounds, validate_clips

    rows = lake.read_partition("clips", BATCH)
    longest = rows.sort("num_frames").tail(1).with_columns(pl.col("fps") * 2 / 3, pl.lit("stretched").alias("id"))
    later = SimpleNamespace(instance=instance, partition_key=BATCH, has_partition_key=True)
    bounds = clip_bounds(later)
    assert (bounds.min_seconds, bounds.max_seconds) == (1.0, 2.0) and cut.run_id in bounds.source
    result = validate_clips(pl.concat([rows, longest], how="vertical_relaxed"), bounds)  # a 3 s clip
    assert not result.passed and "stretched: 3.00 s is outside 1..2 s" in result.metadata["problems"].value

    # A virtual clip whose range its source does not hold fails too (a table and a source that disagree).
    assert rows["virtual"].all()
    beyond = rows.head(1).with_columns(pl.col("start_frame") + 1000, pl.col("end_frame") + 1000, pl.lit("beyond").alias("id"))
    result = validate_clips(pl.concat([rows, beyond], how="vertical_relaxed"), bounds)
    assert not result.passed and "beyond: range 1000..1036 is outside the 132 frames" in result.metadata["problems"].value
    assert validate_clips(rows, bounds).passed

    # Cut again with the defaults: the check follows (2..15 s), and the 1.5 s shot is no longer a clip.
    again = run([raw_videos, scenes, clips, clips_are_valid], lake, instance)
    (passed, _, info) = checks_of(again)["clips_are_valid"]
    assert again.success and passed and info["bounds_s"] == "2..15"
    assert lake.query("SELECT count(*) AS n FROM clips")["n"][0] == 1
