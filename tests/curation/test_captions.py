"""Sidecar captions, the overlap rule, cleaning, and the never-invent-a-caption rule of ``caption_clips``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curation.caption_sidecars import CaptionLookup, SidecarCaptions, SidecarError
from curation.captions import (
    CAPTION_COLUMNS,
    ClipColumns,
    caption_clips,
    caption_counts,
    caption_table,
    clean_dataset_caption,
)
from curation.samples import SyntheticVideo, default_synthetic_set, write_captions_csv

FPS = 24


@pytest.fixture()
def synthetic_batch(tmp_path: Path) -> tuple[Path, list[SyntheticVideo]]:
    """The demo's synthetic set with its truthful captions.csv; the videos are empty placeholders (never decoded)."""
    videos = []
    for name, shots in default_synthetic_set(FPS).items():
        path = tmp_path / f"{name}.mp4"
        path.write_bytes(b"")
        videos.append(SyntheticVideo(path=path, fps=FPS, width=320, height=192, shots=shots))
    write_captions_csv(videos, tmp_path / "captions.csv")
    return tmp_path, videos


def clip(clip_id: str, video: str, start: float, end: float) -> dict:
    return {"id": clip_id, "video_path": video, "start_s": start, "end_s": end}


class FakeCaptioner:
    """Stands in for a VLM: records what it was asked and answers with LLM-style lead-ins."""

    name = "fake-vlm"
    batch_size = 2

    def __init__(self, answer: str = "The video shows a dog running on grass.") -> None:
        self.answer = answer
        self.calls: list[int] = []

    def caption(self, clips_frames):
        self.calls.append(len(clips_frames))
        assert all(len(frames) >= 1 for frames in clips_frames)
        return [self.answer for _ in clips_frames]


# ---------------------------------------------------------------------------------------------------------------
# Sidecar formats
# ---------------------------------------------------------------------------------------------------------------


def test_csv_ranges_give_each_shot_its_own_truthful_caption(synthetic_batch):
    batch, videos = synthetic_batch
    sidecars = SidecarCaptions.from_batch_dir(batch)
    for video in videos:
        for shot, (start, end) in zip(video.shots, video.shot_ranges()):
            found = sidecars.lookup(video.path.name, start / FPS, end / FPS)
            assert found == CaptionLookup(shot.caption(), "sidecar:captions.csv")
    assert sidecars.files == {v.path.name for v in videos}


def test_overlap_rule_picks_the_largest_overlap_of_at_least_half_the_clip(synthetic_batch):
    batch, videos = synthetic_batch
    sidecars = SidecarCaptions.from_batch_dir(batch)
    cuts = videos[0]  # shots: moving [0,3), static [3,5.5), text [5.5,8), moving [8,11)
    moving, static, text = (s.caption() for s in cuts.shots[:3])
    # 2.0 s of the clip in the static shot, 1.0 s in the first moving shot: static wins.
    assert sidecars.lookup(cuts.path.name, 2.0, 5.0).text == static
    assert sidecars.lookup(cuts.path.name, 4.5, 7.5).text == text
    # Exactly half (1.5 of 3.0 s) still counts; on a tie the earlier row wins.
    assert sidecars.lookup(cuts.path.name, 1.5, 4.5).text == moving
    assert sidecars.lookup(cuts.path.name, 4.0, 7.0).text == static
    # A clip spread over three shots, none covering half of it, and no whole-video caption: nothing.
    assert sidecars.lookup(cuts.path.name, 2.0, 9.0) is None
    # Past the end of every range: nothing.
    assert sidecars.lookup(cuts.path.name, 20.0, 22.0) is None
    assert len({moving, static, text}) == 3


def test_whole_video_txt_applies_when_no_range_covers_half(synthetic_batch):
    batch, videos = synthetic_batch
    (batch / "synthetic_cuts.txt").write_text("A test card video\nwith several shots.\n")
    sidecars = SidecarCaptions.from_batch_dir(batch)
    found = sidecars.lookup("synthetic_cuts.mp4", 2.0, 9.0)
    assert found == CaptionLookup("A test card video with several shots.", "sidecar:synthetic_cuts.txt")
    # A range that covers the clip still wins over the whole-video text.
    assert sidecars.lookup("synthetic_cuts.mp4", 0.0, 3.0).source == "sidecar:captions.csv"
    # Without a clip interval only the whole-video caption can apply.
    assert sidecars.lookup("synthetic_cuts.mp4").source == "sidecar:synthetic_cuts.txt"


def test_txt_sidecars_in_subfolders_and_stray_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.mov").write_bytes(b"")
    (tmp_path / "sub" / "b.txt").write_text("a cat on a sofa")
    (tmp_path / "a.b.mp4").write_bytes(b"")
    (tmp_path / "a.txt").write_text("belongs to no video: a.b.mp4 has stem 'a.b'")
    (tmp_path / "README.txt").write_text("licence notes")
    sidecars = SidecarCaptions.from_batch_dir(tmp_path)
    assert sidecars.lookup("sub/b.mov", 0, 1) == CaptionLookup("a cat on a sofa", "sidecar:sub/b.txt")
    assert sidecars.lookup("./sub/b.mov") == CaptionLookup("a cat on a sofa", "sidecar:sub/b.txt")
    assert sidecars.lookup("a.b.mp4") is None
    assert len(sidecars) == 1


def test_json_list_with_ranges_and_whole_video_items(tmp_path):
    items = [
        {"file": "v.mp4", "start_s": 0, "end_s": 4, "text": "waves on a beach"},
        {"file": "v.mp4", "start_s": 4, "end_s": 8, "text": "a lighthouse at dusk"},
        {"file": "w.mp4", "text": "a city street at night"},
    ]
    (tmp_path / "captions.json").write_text(json.dumps(items))
    sidecars = SidecarCaptions.from_batch_dir(tmp_path)
    assert sidecars.lookup("v.mp4", 3.0, 7.0) == CaptionLookup("a lighthouse at dusk", "sidecar:captions.json")
    assert sidecars.lookup("v.mp4", 0.5, 3.5).text == "waves on a beach"
    assert sidecars.lookup("w.mp4", 10, 12) == CaptionLookup("a city street at night", "sidecar:captions.json")


def test_json_mapping_of_file_to_text(tmp_path):
    (tmp_path / "captions.json").write_text(json.dumps({"a.mp4": "a red kite", "sub/b.mp4": "a blue boat"}))
    sidecars = SidecarCaptions.from_batch_dir(tmp_path)
    assert sidecars.lookup("a.mp4", 0, 2).text == "a red kite"
    assert sidecars.lookup("sub/b.mp4", 0, 2).text == "a blue boat"


@pytest.mark.parametrize(
    "content, message",
    [
        ("video,text\na.mp4,hi\n", r"captions\.csv:1: .*lacks column.*file"),
        ("file,start_s,end_s,text\na.mp4,0,2,ok\na.mp4,zero,2,bad\n", r"captions\.csv:3: start_s must be a number"),
        ("file,start_s,end_s,text\na.mp4,3,2,backwards\n", r"captions\.csv:2: end_s .* greater than start_s"),
        ("file,start_s,end_s,text\na.mp4,1,,half\n", r"captions\.csv:2: give both start_s and end_s"),
        ("file,text\n,no file\n", r"captions\.csv:2: 'file' is missing"),
        ("file,text\na.mp4,one\na.mp4,two\n", r"captions\.csv:3: second whole-video caption .*captions\.csv:2"),
        ("file,text\na.mp4,x,extra\n", r"captions\.csv:2: 3 fields for 2 columns"),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path, content, message):
    (tmp_path / "captions.csv").write_text(content)
    with pytest.raises(SidecarError, match=message):
        SidecarCaptions.from_batch_dir(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"file": "a.mp4", "text": "x"},\n {"file": "b.mp4" "text": "y"}]', r"captions\.json:2: invalid JSON"),
        ('[{"file": "a.mp4", "text": "x"}, "b.mp4"]', r"captions\.json item 1: expected an object"),
        ('[{"file": "a.mp4"}]', r"captions\.json item 0: 'text' is missing"),
        ('[{"file": "a.mp4", "text": "x", "start": 1}]', r"captions\.json item 0: unknown key"),
        ('{"a.mp4": 3}', r"captions\.json key 'a\.mp4': 'text' must be a string"),
        ('"just a string"', r"captions\.json: top level must be"),
    ],
)
def test_malformed_json_names_file_and_place(tmp_path, content, message):
    (tmp_path / "captions.json").write_text(content)
    with pytest.raises(SidecarError, match=message):
        SidecarCaptions.from_batch_dir(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------------------------------------------


def test_cleaning_strips_llm_prefix_and_urls():
    assert clean_dataset_caption("The video shows a red car on a road.") == "A red car on a road."
    assert clean_dataset_caption("In the video, a man rides a horse. https://example.com/v/1") == "A man rides a horse."
    assert clean_dataset_caption("a dog   runs\nthrough www.foo.org/x snow") == "a dog runs through snow"
    # Readable text stays as it was: the T5 clean-up (lower-casing etc.) only on request.
    assert clean_dataset_caption("Two Cats, one BOX") == "Two Cats, one BOX"
    assert clean_dataset_caption("Two Cats, one BOX", t5_clean=True) == "two cats, one box"


@pytest.mark.parametrize("text", [None, "", "   ", "...", "https://example.com/video.mp4", "The video shows"])
def test_cleaning_returns_none_for_empty_captions(text):
    assert clean_dataset_caption(text) is None


def test_empty_sidecar_captions_are_dropped_with_reasons(tmp_path):
    (tmp_path / "captions.csv").write_text("file,text\na.mp4,\nb.mp4,see https://example.com/b\nc.mp4,The video shows\n")
    rows = caption_clips([clip("a0", "a.mp4", 0, 2), clip("b0", "b.mp4", 0, 2), clip("c0", "c.mp4", 0, 2)], tmp_path)
    assert [r.text for r in rows] == [None, "see", None]
    assert rows[0].reason_code == "empty_caption" and "sidecar:captions.csv" in rows[0].reason
    assert rows[2].reason_code == "empty_after_cleaning"
    assert rows[1].source == "sidecar:captions.csv"


# ---------------------------------------------------------------------------------------------------------------
# caption_clips
# ---------------------------------------------------------------------------------------------------------------


def test_no_sidecar_and_no_captioner_gives_no_caption(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"")
    rows = caption_clips([clip("x0", "x.mp4", 0.0, 2.0), clip("x1", "x.mp4", 2.0, 4.0)], tmp_path)
    for row in rows:
        assert row.text is None and row.source is None
        assert row.reason_code == "no_source"
        assert "no sidecar caption for x.mp4" in row.reason and "no captioner model configured" in row.reason
    counts = caption_counts(rows)
    assert counts == {"total": 2, "captioned": 0, "uncaptioned": 2, "dropped:no_source": 2}


def test_sidecar_wins_over_model_and_model_fills_the_gaps(synthetic_batch):
    batch, videos = synthetic_batch
    clips = [
        clip("c0", str((batch / "synthetic_cuts.mp4").resolve()), 0.0, 3.0),  # absolute path under the batch
        clip("c1", "synthetic_cuts.mp4", 2.0, 9.0),  # no range covers half: goes to the model
        clip("c2", "unknown.mp4", 0.0, 2.0),  # no sidecar at all: goes to the model
    ]
    captioner = FakeCaptioner()
    loaded: list[str] = []

    def frames_loader(row):
        loaded.append(row["id"])
        return ["frame"]

    rows = caption_clips(clips, batch, captioner, frames_loader)
    assert rows[0].text == videos[0].shots[0].caption() and rows[0].source == "sidecar:captions.csv"
    assert [r.text for r in rows[1:]] == ["A dog running on grass."] * 2  # lead-in stripped
    assert {r.source for r in rows[1:]} == {"model:fake-vlm"}
    assert loaded == ["c1", "c2"] and captioner.calls == [2]
    assert caption_counts(rows) == {
        "total": 3, "captioned": 3, "uncaptioned": 0, "source:sidecar:captions.csv": 1, "source:model:fake-vlm": 2,
    }

    # The order is configurable: model first overrides the sidecar.
    rows = caption_clips(clips, batch, FakeCaptioner("a cat"), lambda row: ["frame"], order=("model", "sidecar"))
    assert [r.source for r in rows] == ["model:fake-vlm"] * 3


def test_model_batches_and_empty_model_output(tmp_path):
    captioner = FakeCaptioner(answer="The video shows")
    clips = [clip(f"k{i}", "v.mp4", i, i + 1) for i in range(5)]
    rows = caption_clips(clips, tmp_path, captioner, lambda row: [] if row["id"] == "k4" else ["f"])
    assert captioner.calls == [2, 2]  # batch_size 2; k4 had no frames and never reached the model
    assert [r.reason_code for r in rows] == ["empty_after_cleaning"] * 4 + ["no_frames"]
    assert all(r.text is None for r in rows)


def test_caption_clips_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="frames_loader"):
        caption_clips([clip("a", "a.mp4", 0, 1)], tmp_path, FakeCaptioner())
    with pytest.raises(ValueError, match="order"):
        caption_clips([clip("a", "a.mp4", 0, 1)], tmp_path, order=("gpt4v",))


def test_custom_columns_and_table(tmp_path):
    (tmp_path / "captions.json").write_text(json.dumps({"v.mp4": "a kite in the sky"}))
    rows = caption_clips(
        [{"clip_id": "z", "path": "v.mp4", "t0": 0.0, "t1": 1.0}, {"clip_id": "y", "path": "q.mp4", "t0": 0.0, "t1": 1.0}],
        tmp_path,
        columns=ClipColumns(id="clip_id", video_path="path", start_s="t0", end_s="t1"),
    )
    table = caption_table(rows)
    assert table.columns == list(CAPTION_COLUMNS)
    assert table.row(0) == ("z", "a kite in the sky", "sidecar:captions.json", None, None)
    assert table.row(1)[1] is None and table.row(1)[4] == "no_source"

