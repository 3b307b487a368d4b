"""Captions for clips: sidecar files shipped with the videos first, a vision-language model second, never invented.

Public datasets usually arrive with their text: a ``<video>.txt`` beside each video, or one ``captions.csv`` /
``captions.json`` in the batch folder, possibly with per-shot time ranges. :class:`SidecarCaptions` reads those
once per batch and answers "which caption belongs to this clip". A clip whose interval overlaps a time-ranged
caption by at least half of the clip's length takes the caption it overlaps most; otherwise the video's
whole-video caption applies, if there is one.

:func:`caption_clips` combines the sources in a configurable order (sidecar, then model, by default) and cleans
every caption the way the reference's ``datautil`` does (URLs removed, LLM lead-ins such as "The video shows"
stripped, empties dropped). A clip with no source gets ``text=None`` and a reason, so the dataset can count and
drop it; nothing is made up.

Nothing heavy is imported here: the captioner object is passed in (see ``models.scorers.captioner``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from curation.errors import InputRejected
from curation.probe import VIDEO_EXTENSIONS, landing_path

CSV_SIDECAR = "captions.csv"
JSON_SIDECAR = "captions.json"

# A time-ranged caption must cover at least this fraction of a clip to be that clip's caption.
MIN_OVERLAP_FRACTION = 0.5

CAPTION_COLUMNS = ("id", "text", "source", "reason", "reason_code")

# Why a clip has no caption, as a short code for counting: a source gave an empty caption, gave one that cleaning
# emptied, had no frames to show the model, or no source had anything for the clip at all.
REASON_CODES = ("empty_caption", "empty_after_cleaning", "no_frames", "no_source")


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
        key = _normalise_file(str(video_filename))
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
                    key = _normalise_file(video.relative_to(batch_dir).as_posix())
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


def _normalise_file(name: str) -> str:
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
    return _normalise_file(file), text, start_s, end_s, where


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


# ---------------------------------------------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------------------------------------------


def clean_dataset_caption(text: str | None, *, t5_clean: bool = False) -> str | None:
    """Clean one caption as the reference's datautil does; None when nothing is left.

    URLs are removed, then an LLM lead-in ("The video shows ...") is stripped and the rest capitalised, and the
    whitespace collapsed. ``t5_clean`` additionally applies the DeepFloyd/PixArt ``clean_caption`` (lower-cases,
    drops handles, codes, boilerplate); it is off by default because training applies it when prompts are
    encoded, and the dataset should keep the caption a person can read.
    """
    from models.caption_clean import clean_caption, is_empty_caption, remove_urls, strip_llm_prefix

    if is_empty_caption(text):
        return None
    cleaned = strip_llm_prefix(remove_urls(str(text)))
    if t5_clean:
        cleaned = clean_caption(cleaned)
    cleaned = " ".join(cleaned.split())
    return None if is_empty_caption(cleaned) else cleaned


def _empty_attempt(raw: str | None, source: str) -> tuple[str, str]:
    """(reason code, reason text) for a source whose caption cleaned down to nothing."""
    from models.caption_clean import is_empty_caption

    if is_empty_caption(raw):
        return "empty_caption", f"empty caption from {source}"
    return "empty_after_cleaning", f"caption from {source} is empty after cleaning (only URLs / an LLM lead-in)"


# ---------------------------------------------------------------------------------------------------------------
# Captioning a batch of clips
# ---------------------------------------------------------------------------------------------------------------


class Captioner(Protocol):
    """What :func:`caption_clips` needs from a model captioner (``models.scorers.captioner.VLMCaptioner`` is one)."""

    name: str
    batch_size: int

    def caption(self, clips_frames: Sequence[Sequence[Any]]) -> list[str]: ...


@dataclass(frozen=True)
class CaptionRow:
    """One clip's caption. ``text`` None means no caption: ``reason`` says why, and the clip leaves the dataset."""

    id: str
    text: str | None
    source: str | None  # "sidecar:captions.csv", "sidecar:<stem>.txt", "model:<name>", or None
    reason: str | None = None  # what each source said, e.g. "no sidecar caption for a.mp4; no captioner model configured"
    reason_code: str | None = None  # one of REASON_CODES when text is None

    def to_row(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ClipColumns:
    """Names of the clip-row fields :func:`caption_clips` reads; rename them here if the clips table differs."""

    id: str = "id"
    video_path: str = "video_path"  # absolute, or relative to the batch folder
    start_s: str = "start_s"
    end_s: str = "end_s"


class CaptionResult(list):
    """What :func:`caption_clips` returns: the :class:`CaptionRow` list itself, plus ``bad_sidecars``.

    ``bad_sidecars`` lists the sidecar files that could not be used (not UTF-8/UTF-16 text, malformed, contradicting
    themselves), each with the reason; the captions asset quarantines them with :meth:`quarantine_rows`.
    """

    def __init__(self, rows: Iterable[CaptionRow] = (), bad_sidecars: Iterable[BadSidecar] = ()) -> None:
        super().__init__(rows)
        self.bad_sidecars: list[BadSidecar] = list(bad_sidecars)

    def quarantine_rows(self, stage: str = "captions") -> list[dict]:
        """``quarantine`` records (path, stage, reason) of the bad sidecars."""
        return [{"path": bad.path, "stage": stage, "reason": bad.reason} for bad in self.bad_sidecars]


FramesLoader = Callable[[Mapping[str, Any]], Sequence[Any]]

SOURCES = ("sidecar", "model")


def _video_key(video_path: str, batch_dir: Path) -> str:
    """The sidecar key of a clip's source video: its path relative to the batch folder, else its file name."""
    path = Path(video_path)
    if not path.is_absolute():
        return _normalise_file(str(video_path))
    try:  # where the file lies, not where a link made by ``ingest --link`` points
        return _normalise_file(Path(landing_path(path)).relative_to(batch_dir.resolve()).as_posix())
    except ValueError:
        return _normalise_file(path.name)


def caption_clips(
    clips: Iterable[Mapping[str, Any]],
    batch_dir: str | Path,
    captioner: Captioner | None = None,
    frames_loader: FramesLoader | None = None,
    *,
    order: Sequence[str] = SOURCES,
    sidecars: SidecarCaptions | None = None,
    columns: ClipColumns = ClipColumns(),
    t5_clean: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CaptionResult:
    """Caption every clip from the first source in ``order`` that yields a non-empty cleaned caption.

    Args:
        clips: clip rows (e.g. ``df.iter_rows(named=True)``) with the fields named in ``columns``.
        batch_dir: the landing folder whose sidecars describe the clips' videos.
        captioner: a model captioner, or None when no model is configured.
        frames_loader: ``row -> frames`` (RGB uint8 [H, W, 3]) kept for the clip; required with a captioner.
        order: sources to try, any of ``("sidecar", "model")`` in order of preference.
        sidecars: pre-read sidecars (read from ``batch_dir`` if None, skipping and reporting malformed files).
        t5_clean: also apply the T5 caption cleaning (see :func:`clean_dataset_caption`).

    Returns one :class:`CaptionRow` per clip in input order (a :class:`CaptionResult`, whose ``bad_sidecars``
    lists the sidecar files that could not be used, with reasons: one bad file never costs the other videos their
    captions). Clips with no usable source get ``text=None`` and a reason listing what was tried; counts by source
    and reason come from :func:`caption_counts`.
    """
    unknown = [s for s in order if s not in SOURCES]
    if unknown or not order:
        raise ValueError(f"order must list sources from {SOURCES}, got {tuple(order)}")
    if captioner is not None and "model" in order and frames_loader is None:
        raise ValueError("a captioner needs a frames_loader (row -> the frames kept for the clip)")
    batch_dir = Path(batch_dir)
    if sidecars is None and "sidecar" in order:
        sidecars = SidecarCaptions.from_batch_dir(batch_dir, strict=False)

    rows = list(clips)
    results: list[CaptionRow | None] = [None] * len(rows)
    tried: list[list[tuple[str, str]]] = [[] for _ in rows]  # (code, text) per source tried

    for source in order:
        pending = [i for i, r in enumerate(results) if r is None]
        if not pending:
            break
        if source == "sidecar":
            for i in pending:
                row = rows[i]
                key = _video_key(str(row[columns.video_path]), batch_dir)
                found = sidecars.lookup(key, row.get(columns.start_s), row.get(columns.end_s))
                if found is None:
                    tried[i].append(("no_source", f"no sidecar caption for {key}"))
                    continue
                text = clean_dataset_caption(found.text, t5_clean=t5_clean)
                if text is None:
                    tried[i].append(_empty_attempt(found.text, found.source))
                else:
                    results[i] = CaptionRow(str(row[columns.id]), text, found.source)
        else:  # "model"
            if captioner is None:
                for i in pending:
                    tried[i].append(("no_source", "no captioner model configured"))
                continue
            label = f"model:{captioner.name}"
            for start in range(0, len(pending), captioner.batch_size):
                chunk = pending[start : start + captioner.batch_size]
                frames = [list(frames_loader(rows[i])) for i in chunk]
                with_frames = [(i, f) for i, f in zip(chunk, frames) if f]
                for i, f in zip(chunk, frames):
                    if not f:
                        tried[i].append(("no_frames", "no frames kept for the clip"))
                raw = captioner.caption([f for _, f in with_frames]) if with_frames else []
                if len(raw) != len(with_frames):
                    raise RuntimeError(f"{label} returned {len(raw)} captions for {len(with_frames)} clips")
                for (i, _), text_raw in zip(with_frames, raw):
                    text = clean_dataset_caption(text_raw, t5_clean=t5_clean)
                    if text is None:
                        tried[i].append(_empty_attempt(text_raw, label))
                    else:
                        results[i] = CaptionRow(str(rows[i][columns.id]), text, label)
                if progress:
                    progress(f"{label}: captioned {min(start + len(chunk), len(pending))}/{len(pending)} clips")

    return CaptionResult(
        (r if r is not None else _uncaptioned(str(rows[i][columns.id]), tried[i]) for i, r in enumerate(results)),
        sidecars.problems if sidecars is not None else (),
    )


def _uncaptioned(clip_id: str, tried: list[tuple[str, str]]) -> CaptionRow:
    """A clip no source could caption: the first substantive failure names the code, else "no_source"."""
    codes = [code for code, _ in tried if code != "no_source"]
    return CaptionRow(clip_id, None, None, "; ".join(text for _, text in tried), codes[0] if codes else "no_source")


def caption_counts(rows: Sequence[CaptionRow]) -> dict[str, int]:
    """Counts for asset metadata: total, captioned, uncaptioned, ``source:<source>`` and ``dropped:<reason code>``."""
    counts: dict[str, int] = {"total": len(rows), "captioned": 0, "uncaptioned": 0}
    for row in rows:
        if row.text is None:
            counts["uncaptioned"] += 1
            key = f"dropped:{row.reason_code}"
        else:
            counts["captioned"] += 1
            key = f"source:{row.source}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def caption_table(rows: Sequence[CaptionRow]):
    """The captions as a polars DataFrame with columns ``CAPTION_COLUMNS`` (all strings, nulls allowed)."""
    import polars as pl

    schema = {name: pl.String for name in CAPTION_COLUMNS}
    return pl.DataFrame([r.to_row() for r in rows], schema=schema)


__all__ = [
    "CAPTION_COLUMNS",
    "BadSidecar",
    "CaptionLookup",
    "CaptionResult",
    "CaptionRow",
    "Captioner",
    "REASON_CODES",
    "ClipColumns",
    "SidecarCaptions",
    "SidecarError",
    "caption_clips",
    "caption_counts",
    "caption_table",
    "clean_dataset_caption",
]
