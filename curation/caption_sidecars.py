"""Caption sidecars: the captions a batch of videos arrives with, and which of them belongs to a clip.

Public datasets usually arrive with their text: a ``<video>.txt`` beside each video, or one ``captions.csv`` /
``captions.json`` in the batch folder, possibly with per-shot time ranges. :class:`SidecarCaptions` reads those
once per batch and answers "which caption belongs to this clip". A clip whose interval overlaps a time-ranged
caption by at least half of the clip's length takes the caption it overlaps most; otherwise the video's
whole-video caption applies, if there is one. Captions are returned raw: ``curation.captions`` cleans them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from curation.errors import InputRejected
from curation.probe import VIDEO_EXTENSIONS, landing_path

CSV_SIDECAR = "captions.csv"
JSON_SIDECAR = "captions.json"

# A time-ranged caption must cover at least this fraction of a clip to be that clip's caption.
MIN_OVERLAP_FRACTION = 0.5


class SidecarError(InputRejected, ValueError):
    """A caption sidecar file is malformed; the message names the file and the line (or JSON item)."""


@dataclass(frozen=True)
class BadSidecar:
    """A sidecar file that could not be used: where it lies (absolute) and why. Its captions are not used at all."""

    path: str
    reason: str


@dataclass(frozen=True)
class CaptionLookup:
    """The raw (uncleaned) caption a sidecar gives for a clip and where it came from, e.g. ``sidecar:captions.csv``."""

    text: str
    source: str


@dataclass(frozen=True)
class _RangedCaption:
    start_s: float
    end_s: float
    text: str
    source: str


@dataclass
class SidecarCaptions:
    """All sidecar captions of one batch folder, keyed by the video's path relative to the folder (POSIX form).

    ``ranged[file]`` holds the time-ranged captions in file order; ``whole[file]`` the whole-video caption.
    """

    ranged: dict[str, list[_RangedCaption]] = field(default_factory=dict)
    whole: dict[str, CaptionLookup] = field(default_factory=dict)
    problems: list[BadSidecar] = field(default_factory=list)  # files skipped when read with strict=False

    @classmethod
    def from_batch_dir(cls, batch_dir: str | Path, *, strict: bool = True) -> "SidecarCaptions":
        """Read ``captions.csv``, ``captions.json`` and every ``<video stem>.txt`` that sits beside a video.

        Whole-video captions are taken in the order txt, csv, json: a second whole-video caption for the same video
        from a later source is ignored, but two different ones within one csv/json file are an error (the file
        contradicts itself; the same row twice is not). Files are text in UTF-8 (with or without BOM) or UTF-16
        with a BOM. File names are compared after NFC normalisation, so a name written by macOS (NFD) matches.

        A malformed file raises :class:`SidecarError`; with ``strict=False`` it is skipped whole instead (none of
        its captions is used) and listed in ``problems`` with the reason, and every other file still counts. The
        files are those :func:`curation.ingest.list_batch_files` lists: a link leaving the folder is never read.
        """
        from curation.ingest import list_batch_files

        batch_dir = Path(batch_dir)
        if not batch_dir.is_dir():
            raise FileNotFoundError(f"batch folder {batch_dir} does not exist")
        captions = cls()
        files = list_batch_files(batch_dir)
        captions._read_txt_sidecars(batch_dir, files, strict)
        listed = set(files)
        for name, reader in ((CSV_SIDECAR, _read_csv), (JSON_SIDECAR, _read_json)):
            path = batch_dir / name
            if path in listed:
                captions._read_one(path, strict, lambda: captions._add_rows(reader(path), f"sidecar:{name}"))
        return captions

    def _read_one(self, path: Path, strict: bool, read: Callable[[], None]) -> None:
        """Run ``read``; when not ``strict`` a malformed or unreadable file becomes a problem, not an exception."""
        try:
            read()
        except SidecarError as err:
            if strict:
                raise
            self.problems.append(BadSidecar(landing_path(path), str(err)))
        except OSError as err:
            if strict:
                raise
            self.problems.append(BadSidecar(landing_path(path), f"{path.name}: cannot be read ({err.strerror or err})"))

    def __len__(self) -> int:
        return sum(len(v) for v in self.ranged.values()) + len(self.whole)

    @property
    def files(self) -> set[str]:
        """Videos (relative POSIX paths) that have at least one sidecar caption."""
        return set(self.ranged) | set(self.whole)

    def lookup(self, video_filename: str | Path, start_s: float | None = None, end_s: float | None = None) -> CaptionLookup | None:
        """The caption for the clip ``[start_s, end_s)`` of ``video_filename`` (relative to the batch folder).

        Among the video's time-ranged captions the one overlapping the clip most wins, provided the overlap is at
        least half the clip (ties go to the earlier row); otherwise the whole-video caption, else None. Without a
        clip interval only the whole-video caption can apply.
        """
        key = normalise_file(str(video_filename))
        if start_s is not None and end_s is not None:
            start_s, end_s = float(start_s), float(end_s)
            if end_s < start_s:
                raise ValueError(f"clip of {key} ends ({end_s}) before it starts ({start_s})")
            best, best_overlap = None, 0.0
            for caption in self.ranged.get(key, []):
                if end_s == start_s:  # a zero-length clip: the range containing its instant
                    overlap = 1.0 if caption.start_s <= start_s < caption.end_s else 0.0
                    needed = 1.0
                else:
                    overlap = max(0.0, min(end_s, caption.end_s) - max(start_s, caption.start_s))
                    needed = MIN_OVERLAP_FRACTION * (end_s - start_s)
                if overlap > best_overlap and overlap >= needed:
                    best, best_overlap = caption, overlap
            if best is not None:
                return CaptionLookup(best.text, best.source)
        return self.whole.get(key)

    # -- readers ---------------------------------------------------------------------------------------------

    def _read_txt_sidecars(self, batch_dir: Path, files: list[Path], strict: bool) -> None:
        videos_by_stem: dict[tuple[Path, str], list[Path]] = {}
        for path in files:
            if path.suffix.lower() in VIDEO_EXTENSIONS:
                videos_by_stem.setdefault((path.parent, _nfc(path.stem)), []).append(path)
        for txt in files:
            if txt.suffix != ".txt":
                continue
            videos = sorted(videos_by_stem.get((txt.parent, _nfc(txt.stem)), []))
            if not videos:
                continue  # a note or licence file, not a caption
            rel = txt.relative_to(batch_dir).as_posix()

            def read(txt: Path = txt, rel: str = rel, videos: list[Path] = videos) -> None:
                text = " ".join(_read_text(txt, rel).split())  # a multi-line caption is one caption
                for video in videos:
                    key = normalise_file(video.relative_to(batch_dir).as_posix())
                    self.whole.setdefault(key, CaptionLookup(text, f"sidecar:{rel}"))

            self._read_one(txt, strict, read)

    def _add_rows(self, rows: Iterable[tuple[str, str, float | None, float | None, str]], source: str) -> None:
        """Add one file's rows, all or none: a file that contradicts itself adds nothing."""
        whole_seen: dict[str, tuple[str, str]] = {}
        whole: list[tuple[str, str]] = []
        ranged: list[tuple[str, _RangedCaption]] = []
        for file, text, start_s, end_s, where in rows:
            if start_s is None:
                if file in whole_seen:
                    first_text, first_where = whole_seen[file]
                    if text == first_text:
                        continue  # the same row twice says nothing new
                    raise SidecarError(f"{where}: second whole-video caption for {file!r} (first at {first_where})")
                whole_seen[file] = (text, where)
                whole.append((file, text))
            else:
                ranged.append((file, _RangedCaption(start_s, end_s, text, source)))
        for file, text in whole:
            self.whole.setdefault(file, CaptionLookup(text, source))
        for file, caption in ranged:
            self.ranged.setdefault(file, []).append(caption)


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def normalise_file(name: str) -> str:
    """``"./sub/a.mp4"`` and ``"sub\\a.mp4"`` -> ``"sub/a.mp4"``: sidecar keys and lookups compare in this form.

    Names are NFC-normalised, so ``café.mp4`` written by macOS (NFD: ``e`` + combining accent) finds its row.
    """
    path = PurePosixPath(_nfc(name.strip().replace("\\", "/")))
    return path.as_posix().removeprefix("./")


_UTF8_BOM = b"\xef\xbb\xbf"
_UTF32_BOMS = (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")
_UTF16_BOMS = {b"\xff\xfe": "utf-16-le", b"\xfe\xff": "utf-16-be"}


def _read_text(path: Path, name: str) -> str:
    """A sidecar's text: UTF-8 (with or without BOM) or UTF-16 with a BOM; anything else is a SidecarError.

    Nothing is guessed: bytes that are neither are refused with the offset of the first bad byte, and text with
    NUL characters (typically UTF-16 saved without a BOM) is refused too.
    """
    data = path.read_bytes()
    if data.startswith(_UTF32_BOMS):
        raise SidecarError(f"{name}: UTF-32 text is not supported; save it as UTF-8")
    for bom, encoding in _UTF16_BOMS.items():
        if data.startswith(bom):
            try:
                text = data[len(bom):].decode(encoding)
            except UnicodeDecodeError as err:
                raise SidecarError(f"{name}: not valid {encoding.upper()} text despite its byte-order mark ({err.reason} at byte {err.start + len(bom)})") from err
            break
    else:
        try:
            text = data.removeprefix(_UTF8_BOM).decode("utf-8")
        except UnicodeDecodeError as err:
            offset = err.start + (len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0)
            raise SidecarError(
                f"{name}: not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset}) and no UTF-16 byte-order mark; "
                "save it as UTF-8"
            ) from err
    if "\x00" in text:
        raise SidecarError(f"{name}: contains NUL characters (UTF-16 saved without a byte-order mark?); save it as UTF-8")
    return text


def _parse_time(value: Any, where: str, column: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise SidecarError(f"{where}: {column} must be a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except (TypeError, ValueError) as err:
        raise SidecarError(f"{where}: {column} must be a number of seconds, got {value!r}") from err
    if not math.isfinite(seconds) or seconds < 0:
        raise SidecarError(f"{where}: {column} must be a finite, non-negative number of seconds, got {value!r}")
    return seconds


def _check_row(file: Any, text: Any, start: Any, end: Any, where: str) -> tuple[str, str, float | None, float | None, str]:
    if not isinstance(file, str) or not file.strip():
        raise SidecarError(f"{where}: 'file' is missing or empty")
    if text is None:
        text = ""  # an empty caption is data (dropped later with a reason), not a malformed file
    if not isinstance(text, str):
        raise SidecarError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    start_s, end_s = _parse_time(start, where, "start_s"), _parse_time(end, where, "end_s")
    if (start_s is None) != (end_s is None):
        raise SidecarError(f"{where}: give both start_s and end_s, or neither for a whole-video caption")
    if start_s is not None and end_s <= start_s:
        raise SidecarError(f"{where}: end_s ({end_s}) must be greater than start_s ({start_s})")
    return normalise_file(file), text, start_s, end_s, where


def _read_csv(path: Path) -> list[tuple[str, str, float | None, float | None, str]]:
    """Rows of ``captions.csv``: header with ``file`` and ``text``, optional ``start_s`` / ``end_s``."""
    text = _read_text(path, path.name)
    try:
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in ("file", "text") if c not in header]
            if missing:
                raise SidecarError(f"{path.name}:1: header {header} lacks column(s) {missing}; expected file,text[,start_s,end_s]")
            if ("start_s" in header) != ("end_s" in header):
                raise SidecarError(f"{path.name}:1: header has only one of start_s / end_s")
            rows = []
            for record in reader:
                where = f"{path.name}:{reader.line_num}"
                if None in record:  # more fields than header columns
                    raise SidecarError(f"{where}: {len(header) + len(record[None])} fields for {len(header)} columns")
                if all((v or "").strip() == "" for v in record.values()):
                    continue  # blank line
                rows.append(_check_row(record["file"], record["text"], record.get("start_s"), record.get("end_s"), where))
    except csv.Error as err:
        raise SidecarError(f"{path.name}: malformed CSV ({err})") from err
    return rows


def _read_json(path: Path) -> list[tuple[str, str, float | None, float | None, str]]:
    """``captions.json``: a list of ``{"file", "text"[, "start_s", "end_s"]}`` objects or a ``{file: text}`` mapping."""
    text = _read_text(path, path.name)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SidecarError(f"{path.name}:{err.lineno}: invalid JSON ({err.msg}, column {err.colno})") from err
    rows = []
    if isinstance(data, dict):
        for file, text in data.items():
            rows.append(_check_row(file, text, None, None, f"{path.name} key {file!r}"))
    elif isinstance(data, list):
        for index, item in enumerate(data):
            where = f"{path.name} item {index}"
            if not isinstance(item, dict):
                raise SidecarError(f"{where}: expected an object with file and text, got {type(item).__name__}")
            unknown = set(item) - {"file", "text", "start_s", "end_s"}
            if unknown:
                raise SidecarError(f"{where}: unknown key(s) {sorted(unknown)}")
            if "text" not in item:
                raise SidecarError(f"{where}: 'text' is missing")
            rows.append(_check_row(item.get("file"), item["text"], item.get("start_s"), item.get("end_s"), where))
    else:
        raise SidecarError(f"{path.name}: top level must be a list of objects or a {{file: text}} object, got {type(data).__name__}")
    return rows


__all__ = [
    "BadSidecar",
    "CaptionLookup",
    "SidecarCaptions",
    "SidecarError",
    "normalise_file",
]
