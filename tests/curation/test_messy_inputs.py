"""Messy inputs (issue 12): each bad file costs only itself, with a clear reason; everything else goes on.

The bad files are made for real: a Latin-1 title written by ffmpeg, a stream whose codec FFmpeg does not know,
sidecars in the encodings people actually send, links leaving the landing folder, an ingest cut short.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import unicodedata
from pathlib import Path

import av
import pytest

from curation.caption_sidecars import SidecarCaptions, SidecarError
from curation.captions import caption_clips
from curation.errors import is_input_rejection
from curation.ingest import LINKS_MANIFEST, land_files, list_batch_files, scan_batch
from curation.probe import ProbeError, probe_video
from curation.samples import Shot, write_synthetic_video
from curation.video_io import UndecodableVideo, iter_frames


# ---- makers, shared with tests/dagster/test_messy_batch.py -------------------------------------------------------
def write_small_video(path: Path, colour=(20, 60, 140), frames: int = 30) -> Path:
    """A 2.5 s, 96x64 synthetic clip (distinct bytes per colour)."""
    write_synthetic_video(path, [Shot("moving", frames, colour, speed=3.0)], width=96, height=64, fps=12)
    return Path(path)


def write_latin1_title(source: Path, dest: Path) -> Path:
    """``source`` remuxed with the container title ``été`` in Latin-1 bytes (not UTF-8), passed to ffmpeg as bytes."""
    import imageio_ffmpeg

    argv = [imageio_ffmpeg.get_ffmpeg_exe().encode(), b"-y", b"-v", b"error", b"-i", os.fsencode(source),
            b"-c", b"copy", b"-metadata", b"title=\xe9t\xe9", os.fsencode(dest)]
    subprocess.run(argv, check=True, capture_output=True)
    return Path(dest)


def write_unknown_codec(source: Path, dest: Path) -> Path:
    """``source`` (an H.264 mp4) with its sample entry's fourcc ``avc1`` patched to ``zzzz``: no decoder exists."""
    data = Path(source).read_bytes()
    entry = data.index(b"avc1", data.index(b"stsd"))
    Path(dest).write_bytes(data[:entry] + b"zzzz" + data[entry + 4:])
    return Path(dest)


def outside_system_file() -> Path:
    """A system file a landing folder has no business reaching (the issue's example first)."""
    return next(p for p in (Path("/etc/hostname"), Path("/etc/passwd")) if p.is_file())


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_small_video(tmp_path_factory.mktemp("messy") / "good.mp4")


# ---- 1. probing: metadata that is not UTF-8, a codec nobody decodes, anything else --------------------------------
def test_latin1_metadata_is_read_with_replacement_and_the_video_is_kept(tmp_path, good):
    latin1 = write_latin1_title(good, tmp_path / "latin1.mp4")
    with pytest.raises(UnicodeDecodeError):  # what PyAV does by default: the input really is this bad
        av.open(str(latin1))
    info = probe_video(latin1)
    assert (info.num_frames, info.width, info.height) == (30, 96, 64)
    assert len(list(iter_frames(latin1))) == 30, "scenes and cutting read it too"
    scan = scan_batch(tmp_path)
    assert sorted(Path(p).name for p in scan.videos["path"]) == ["latin1.mp4"]
    assert scan.quarantine.is_empty()


def test_a_codec_ffmpeg_cannot_decode_is_quarantined_with_the_reason(tmp_path, good):
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copy(good, batch / "good.mp4")
    write_unknown_codec(good, batch / "alien.mp4")
    with av.open(str(batch / "alien.mp4")) as container:
        assert container.streams.video[0].codec_context is None  # what PyAV does with it
    with pytest.raises(ProbeError, match="no decoder for the video stream's codec") as caught:
        probe_video(batch / "alien.mp4")
    assert is_input_rejection(caught.value), "the input's fault, not a broken component"
    with pytest.raises(UndecodableVideo, match="no decoder"):  # the reader every later stage uses says the same
        next(iter_frames(batch / "alien.mp4"))
    scan = scan_batch(batch)
    assert [Path(p).name for p in scan.videos["path"]] == ["good.mp4"]
    assert scan.quarantine.rows() == [(str(batch.resolve() / "alien.mp4"), "raw_videos",
                                       "no decoder for the video stream's codec (FFmpeg does not know it)")]


def test_any_exception_while_probing_one_file_quarantines_only_that_file(tmp_path, good, monkeypatch):
    shutil.copy(good, tmp_path / "good.mp4")
    shutil.copy(good, tmp_path / "cursed.mp4")
    (tmp_path / "cursed.mp4").write_bytes((tmp_path / "cursed.mp4").read_bytes() + b"\0")  # distinct bytes
    real_open = av.open

    def fussy_open(file, *args, **kwargs):
        if str(file).endswith("cursed.mp4"):
            raise RuntimeError("something PyAV never promised")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(av, "open", fussy_open)
    scan = scan_batch(tmp_path)
    assert [Path(p).name for p in scan.videos["path"]] == ["good.mp4"]
    assert scan.quarantine["reason"].to_list() == ["probe failed: RuntimeError: something PyAV never promised"]


# ---- 2. sidecars: encodings, a file that contradicts itself, names from macOS -------------------------------------
def clip(clip_id: str, video: str) -> dict:
    return {"id": clip_id, "video_path": video, "start_s": 0.0, "end_s": 2.0}


@pytest.mark.parametrize("encoding, bom", [("utf-8", b""), ("utf-8", b"\xef\xbb\xbf"), ("utf-16-le", b"\xff\xfe"),
                                           ("utf-16-be", b"\xfe\xff")])
def test_sidecars_in_utf8_and_utf16_with_bom_are_read(tmp_path, encoding, bom):
    (tmp_path / "captions.csv").write_bytes(bom + "file,text\ncafé.mp4,un café crème\n".encode(encoding))
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "a.txt").write_bytes(bom + "a kite över the sea".encode(encoding))
    (tmp_path / "captions.json").write_bytes(bom + json.dumps({"j.mp4": "ein Käfer"}, ensure_ascii=False).encode(encoding))
    sidecars = SidecarCaptions.from_batch_dir(tmp_path)
    assert sidecars.lookup("café.mp4").text == "un café crème"
    assert sidecars.lookup("a.mp4").text == "a kite över the sea"
    assert sidecars.lookup("j.mp4").text == "ein Käfer"


@pytest.mark.parametrize(
    "content, reason",
    [
        ("file,text\na.mp4,é\n".encode("latin-1"), r"captions\.csv: not UTF-8 text \(byte 0xe9 at offset 16\) and no UTF-16 byte-order mark"),
        ("file,text\na.mp4,x\n".encode("utf-16-le"), r"captions\.csv: contains NUL characters \(UTF-16 saved without a byte-order mark\?\)"),
        ("file,text\na.mp4,x\n".encode("utf-32"), r"captions\.csv: UTF-32 text is not supported"),
        (b"\xff\xfe" + "file,text\n".encode("utf-16-le") + b"\x00\xd8", r"captions\.csv: not valid UTF-16-LE text"),
    ],
    ids=["latin-1", "utf-16-without-bom", "utf-32", "broken-utf-16"],
)
def test_other_encodings_are_refused_with_a_reason_never_guessed(tmp_path, content, reason):
    (tmp_path / "captions.csv").write_bytes(content)
    with pytest.raises(SidecarError, match=reason):
        SidecarCaptions.from_batch_dir(tmp_path)
    lenient = SidecarCaptions.from_batch_dir(tmp_path, strict=False)
    assert len(lenient) == 0 and len(lenient.problems) == 1


def test_a_bad_sidecar_is_reported_and_every_other_video_keeps_its_captions(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.mp4").write_bytes(b"")
    (tmp_path / "a.txt").write_text("a red kite")
    (tmp_path / "b.txt").write_bytes("un été à Paris".encode("latin-1"))  # not UTF-8: bad
    (tmp_path / "captions.json").write_text(json.dumps([{"file": "c.mp4", "text": "a green boat"},
                                                        {"file": "c.mp4", "text": "a grey boat"}]))  # contradicts itself
    (tmp_path / "captions.csv").write_text("file,text\nb.mp4,a blue car\nb.mp4,a blue car\n")  # the same row twice: fine
    rows = caption_clips([clip("a0", "a.mp4"), clip("b0", "b.mp4"), clip("c0", "c.mp4")], tmp_path)
    assert [(r.text, r.source) for r in rows] == [("a red kite", "sidecar:a.txt"), ("a blue car", "sidecar:captions.csv"),
                                                  (None, None)]
    bad = {Path(b.path).name: b.reason for b in rows.bad_sidecars}
    assert bad == {
        "b.txt": "b.txt: not UTF-8 text (byte 0xe9 at offset 3) and no UTF-16 byte-order mark; save it as UTF-8",
        "captions.json": "captions.json item 1: second whole-video caption for 'c.mp4' (first at captions.json item 0)",
    }
    assert rows.quarantine_rows() == [{"path": str(tmp_path.resolve() / n), "stage": "captions", "reason": bad[n]}
                                      for n in ("b.txt", "captions.json")]
    with pytest.raises(SidecarError) as caught:  # read strictly, the first bad file is an error, as before
        SidecarCaptions.from_batch_dir(tmp_path)
    assert is_input_rejection(caught.value)


def test_file_names_match_after_nfc_normalisation(tmp_path):
    nfd = unicodedata.normalize("NFD", "café.mp4")
    nfc = unicodedata.normalize("NFC", "crème.mp4")
    assert nfd != "café.mp4"
    (tmp_path / nfd).write_bytes(b"")  # a name as macOS writes it
    (tmp_path / nfc).write_bytes(b"")
    (tmp_path / unicodedata.normalize("NFD", "naïve.mp4")).write_bytes(b"")
    (tmp_path / "naïve.txt").write_text("a naive painting")  # NFC stem beside the NFD video
    csv_text = f"file,text\ncafé.mp4,a cup of coffee\n{unicodedata.normalize('NFD', 'crème.mp4')},a bowl of cream\n"
    (tmp_path / "captions.csv").write_text(csv_text)
    rows = caption_clips([clip("k", str(tmp_path / nfd)), clip("c", str(tmp_path / nfc)), clip("n", unicodedata.normalize("NFD", "naïve.mp4"))],
                         tmp_path)
    assert [r.text for r in rows] == ["a cup of coffee", "a bowl of cream", "a naive painting"]
    assert not rows.bad_sidecars


# ---- 3. links leaving the landing folder ---------------------------------------------------------------------------
def test_links_leaving_the_folder_are_quarantined_not_followed(tmp_path, good):
    batch = tmp_path / "batch"
    batch.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(good, outside / "secret.mp4")
    (outside / "captions.csv").write_text("file,text\ngood.mp4,from outside the landing folder\n")
    shutil.copy(good, batch / "good.mp4")
    system = outside_system_file()
    (batch / "escape.mp4").symlink_to(system)
    (batch / "secret.mp4").symlink_to(outside / "secret.mp4")
    (batch / "captions.csv").symlink_to(outside / "captions.csv")
    (batch / "dir").symlink_to(outside)
    (batch / "dangling.mp4").symlink_to(tmp_path / "nothing-here.mp4")
    (batch / "inside.mp4").symlink_to("good.mp4")  # stays in the folder: followed (and deduplicated)

    scan = scan_batch(batch)
    assert scan.videos["path"].to_list() == [str(batch.resolve() / "good.mp4")]
    reasons = {Path(p).name: r for p, r in zip(scan.quarantine["path"], scan.quarantine["reason"])}
    assert all(Path(p).parent == batch.resolve() for p in scan.quarantine["path"]), "recorded where the link lies"
    for name, target in (("escape.mp4", system), ("secret.mp4", outside / "secret.mp4"),
                         ("captions.csv", outside / "captions.csv"), ("dir", outside)):
        assert reasons[name].startswith(f"symbolic link to the {'folder' if name == 'dir' else 'file'} {Path(target).resolve()}, "
                                        "outside the landing folder"), reasons[name]
    assert reasons["dangling.mp4"].startswith("broken symbolic link")
    assert reasons["inside.mp4"].startswith("byte-identical duplicate of")
    assert [p.name for p in scan.sidecars] == []
    # captions never read a file through such a link either
    assert SidecarCaptions.from_batch_dir(batch).lookup("good.mp4") is None


def test_links_made_by_ingest_are_recorded_and_followed(tmp_path, good):
    source = tmp_path / "drop"
    (source / "sub").mkdir(parents=True)
    shutil.copy(good, source / "sub" / "a.mp4")
    (source / "sub" / "a.txt").write_text("a blue square")
    landing = tmp_path / "landing" / "drop"
    report = land_files(source, landing, link=True)
    assert sorted(p.name for p in report.linked) == ["a.mp4", "a.txt"]
    manifest = json.loads((landing / LINKS_MANIFEST).read_text())
    assert manifest == {"links": {"sub/a.mp4": str(source.resolve() / "sub" / "a.mp4"),
                                  "sub/a.txt": str(source.resolve() / "sub" / "a.txt")}}
    scan = scan_batch(landing)
    assert scan.quarantine.is_empty()
    assert scan.videos["path"].to_list() == [str(landing.resolve() / "sub" / "a.mp4")], "recorded in the landing folder"
    rows = caption_clips([clip("a0", scan.videos["path"][0])], landing)
    assert rows[0].text == "a blue square"

    # A recorded link re-pointed elsewhere by hand is no longer ingest's link.
    (landing / "sub" / "a.mp4").unlink()
    (landing / "sub" / "a.mp4").symlink_to(outside_system_file())
    scan = scan_batch(landing)
    assert scan.videos.is_empty() and "outside the landing folder" in scan.quarantine["reason"][0]


# ---- 4. ingest: temporary name + rename; a re-run repairs what differs -----------------------------------------
def _drop(tmp_path: Path, good: Path) -> Path:
    source = tmp_path / "drop"
    source.mkdir()
    shutil.copy(good, source / "a.mp4")
    write_small_video(source / "b.mp4", colour=(200, 120, 30))
    return source


def _landed(home: Path) -> Path:
    return home / "landing" / "drop"


def test_an_interrupted_ingest_leaves_no_truncated_file_and_a_rerun_completes(home, tmp_path, good, monkeypatch, capsys):
    from opensora_dag import cli

    source = _drop(tmp_path, good)
    real_copyfile = shutil.copyfile

    def interrupted(src, dst, *args, **kwargs):  # half the bytes reach the disk, then Ctrl-C
        if Path(src).name == "b.mp4":
            Path(dst).write_bytes(Path(src).read_bytes()[:1000])
            raise KeyboardInterrupt
        return real_copyfile(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--home", str(home), "ingest", str(source)])
    landed = _landed(home)
    assert (landed / "a.mp4").read_bytes() == (source / "a.mp4").read_bytes()
    assert not (landed / "b.mp4").exists(), "nothing under the real name until the copy is complete"
    assert sorted(p.name for p in landed.iterdir()) == ["a.mp4"], "no temporary left behind"

    monkeypatch.setattr(shutil, "copyfile", real_copyfile)
    assert cli.main(["--home", str(home), "ingest", str(source)]) == 0
    assert all((landed / n).read_bytes() == (source / n).read_bytes() for n in ("a.mp4", "b.mp4"))
    capsys.readouterr()


def test_a_rerun_replaces_a_copy_whose_size_or_bytes_differ(home, tmp_path, good, capsys):
    from opensora_dag import cli

    source = _drop(tmp_path, good)
    landed = _landed(home)
    landed.mkdir(parents=True)
    (landed / "a.mp4").write_bytes((source / "a.mp4").read_bytes()[:500])  # what a full disk left before
    same_size = bytearray((source / "b.mp4").read_bytes())
    same_size[-1] ^= 0xFF
    (landed / "b.mp4").write_bytes(bytes(same_size))  # right size, wrong bytes
    assert cli.main(["--home", str(home), "ingest", str(source)]) == 0
    assert all((landed / n).read_bytes() == (source / n).read_bytes() for n in ("a.mp4", "b.mp4"))
    assert "replaced 2 file(s)" in capsys.readouterr().out
    assert scan_batch(landed).quarantine.is_empty()

    report = land_files(source, landed)  # identical now: kept, nothing rewritten
    assert sorted(p.name for p in report.kept) == ["a.mp4", "b.mp4"] and not report.replaced and not report.copied


def test_list_batch_files_skips_ingest_temporaries_and_the_manifest(tmp_path, good):
    source = tmp_path / "drop"
    source.mkdir()
    shutil.copy(good, source / "a.mp4")
    landing = tmp_path / "landing"
    land_files(source, landing, link=True)
    (landing / ".a.mp4.x1y2.ingest-tmp").write_bytes(b"half")
    assert list_batch_files(landing) == [landing / "a.mp4"]
