"""Issue 12's acceptance: one batch mixing every kind of messy input with good videos curates in one run.

Bad inputs are quarantined with clear reasons at the stage that found them; every good video keeps its clips and
captions, whatever else shares its folder.
"""

import json
import unicodedata
from pathlib import Path

from dagster import instance_for_test

from curation.ingest import land_files
from opensora_dag.instance import materialize_selection
from resources.lakehouse import Lakehouse
from tests.curation.test_messy_inputs import write_latin1_title, write_small_video, write_unknown_codec

CAFE_NFD = unicodedata.normalize("NFD", "café.mp4")


def test_messy_batch_curates_the_good_and_quarantines_the_bad(tmp_path):
    lake = Lakehouse(home=str(tmp_path / "home"))
    batch = lake.batch_dir("b1")
    batch.mkdir(parents=True)

    # Linked in by `ingest --link` from a drop folder outside the landing zone: allowed.
    drop = tmp_path / "drop"
    drop.mkdir()
    write_small_video(drop / "linked.mp4", colour=(150, 30, 110))
    (drop / "linked.txt").write_text("a purple square drifting")
    land_files(drop, batch, link=True)

    # Good videos, with captions from every source and encoding that is allowed.
    write_small_video(batch / "plain.mp4", colour=(30, 140, 70))
    (batch / "plain.txt").write_bytes(b"\xef\xbb\xbf" + "a green square drifting".encode())  # UTF-8 with BOM
    write_small_video(batch / CAFE_NFD, colour=(200, 120, 30))  # a name as macOS writes it
    write_small_video(batch / "stray_txt.mp4", colour=(230, 220, 200))
    (batch / "stray_txt.txt").write_bytes("un carré crème".encode("latin-1"))  # bad sidecar: not UTF-8
    source = tmp_path / "source.mp4"
    write_small_video(source, colour=(22, 60, 140))
    write_latin1_title(source, batch / "latin1.mp4")  # Latin-1 title: kept, its frames decode
    csv_text = ("file,text\ncafé.mp4,an orange square drifting\nlatin1.mp4,a blue square drifting\n"
                "stray_txt.mp4,a cream square drifting\nlatin1.mp4,a blue square drifting\n")  # NFC names; a row twice
    (batch / "captions.csv").write_bytes(b"\xff\xfe" + csv_text.encode("utf-16-le"))  # UTF-16 with BOM
    captions_json = [{"file": "plain.mp4", "text": "one"}, {"file": "plain.mp4", "text": "two"}]
    (batch / "captions.json").write_text(json.dumps(captions_json))  # contradicts itself: bad sidecar

    # Bad videos.
    write_unknown_codec(source, batch / "alien.mp4")
    outside = tmp_path / "outside"
    outside.mkdir()
    write_small_video(outside / "secret.mp4", colour=(40, 40, 40))  # decodes fine, but is not this batch's to take
    (batch / "escape.mp4").symlink_to(outside / "secret.mp4")

    with instance_for_test() as instance:
        outcomes = materialize_selection("group:curation", ["b1"], instance, resources={"lakehouse": lake})
        assert outcomes and all(o.success for o in outcomes), outcomes

    landing = batch.resolve()
    quarantine = {(Path(r["path"]).name, r["stage"]): r["reason"]
                  for r in lake.query("SELECT path, stage, reason FROM quarantine").to_dicts()}
    assert set(quarantine) == {("alien.mp4", "raw_videos"), ("escape.mp4", "raw_videos"),
                               ("stray_txt.txt", "captions"), ("captions.json", "captions")}, quarantine
    assert quarantine["alien.mp4", "raw_videos"] == "no decoder for the video stream's codec (FFmpeg does not know it)"
    assert quarantine["escape.mp4", "raw_videos"].startswith(
        f"symbolic link to the file {(outside / 'secret.mp4').resolve()}, outside the landing folder")
    assert quarantine["stray_txt.txt", "captions"].startswith("stray_txt.txt: not UTF-8 text (byte 0xe9 at offset 7)")
    assert quarantine["captions.json", "captions"].startswith("captions.json item 1: second whole-video caption")
    paths = lake.query("SELECT path FROM quarantine")["path"].to_list()
    assert all(Path(p).parent == landing for p in paths), "recorded where they lie in the landing folder"

    videos = {Path(p).name for p in lake.query("SELECT path FROM raw_videos")["path"]}
    assert videos == {"linked.mp4", "plain.mp4", CAFE_NFD, "stray_txt.mp4", "latin1.mp4"}
    captions = lake.query(
        "SELECT v.path, t.text, t.source FROM clips c JOIN raw_videos v ON c.video_id = v.id JOIN captions t ON t.id = c.id"
    ).to_dicts()
    by_video = {}
    for row in captions:
        by_video.setdefault(Path(row["path"]).name, set()).add((row["text"], row["source"]))
    assert by_video == {
        "linked.mp4": {("a purple square drifting", "sidecar:linked.txt")},
        "plain.mp4": {("a green square drifting", "sidecar:plain.txt")},
        CAFE_NFD: {("an orange square drifting", "sidecar:captions.csv")},
        "stray_txt.mp4": {("a cream square drifting", "sidecar:captions.csv")},
        "latin1.mp4": {("a blue square drifting", "sidecar:captions.csv")},
    }, "every good video keeps its clips and captions"
