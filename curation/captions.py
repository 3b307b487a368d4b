"""Captions for clips: sidecar files shipped with the videos first, a vision-language model second, never invented.

Sidecars (``<video>.txt``, ``captions.csv`` / ``captions.json`` in the batch folder) are read by
``curation.caption_sidecars``. :func:`caption_clips` combines the sources in a configurable order (sidecar, then
model, by default) and cleans every caption the way the reference's ``datautil`` does (URLs removed, LLM lead-ins
such as "The video shows" stripped, empties dropped). A clip with no source gets ``text=None`` and a reason, so the
dataset can count and drop it; nothing is made up.

Nothing heavy is imported here: the captioner object is passed in (see ``models.scorers.captioner``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from curation.caption_sidecars import BadSidecar, SidecarCaptions, normalise_file
from curation.probe import landing_path

CAPTION_COLUMNS = ("id", "text", "source", "reason", "reason_code")

# Why a clip has no caption, as a short code for counting: a source gave an empty caption, gave one that cleaning
# emptied, had no frames to show the model, or no source had anything for the clip at all.
REASON_CODES = ("empty_caption", "empty_after_cleaning", "no_frames", "no_source")


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
        return normalise_file(str(video_path))
    try:  # where the file lies, not where a link made by ``ingest --link`` points
        return normalise_file(Path(landing_path(path)).relative_to(batch_dir.resolve()).as_posix())
    except ValueError:
        return normalise_file(path.name)


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
    _check_sources(order, captioner, frames_loader)
    batch_dir = Path(batch_dir)
    if sidecars is None and "sidecar" in order:
        sidecars = SidecarCaptions.from_batch_dir(batch_dir, strict=False)

    attempts = _Attempts(list(clips), columns, t5_clean)
    for source in order:
        pending = attempts.pending()
        if not pending:
            break
        if source == "sidecar":
            _caption_from_sidecars(attempts, pending, sidecars, batch_dir)
        else:  # "model"
            _caption_with_model(attempts, pending, captioner, frames_loader, progress)
    return CaptionResult(attempts.rows_out(), sidecars.problems if sidecars is not None else ())


def _check_sources(order: Sequence[str], captioner: Captioner | None, frames_loader: FramesLoader | None) -> None:
    unknown = [s for s in order if s not in SOURCES]
    if unknown or not order:
        raise ValueError(f"order must list sources from {SOURCES}, got {tuple(order)}")
    if captioner is not None and "model" in order and frames_loader is None:
        raise ValueError("a captioner needs a frames_loader (row -> the frames kept for the clip)")


class _Attempts:
    """Per clip, in input order: its caption once a source gave one, and what each source tried said."""

    def __init__(self, rows: list[Mapping[str, Any]], columns: ClipColumns, t5_clean: bool) -> None:
        self.rows, self.columns, self.t5_clean = rows, columns, t5_clean
        self.results: list[CaptionRow | None] = [None] * len(rows)
        self.tried: list[list[tuple[str, str]]] = [[] for _ in rows]  # (code, text) per source tried

    def pending(self) -> list[int]:
        return [i for i, r in enumerate(self.results) if r is None]

    def failed(self, i: int, code: str, text: str) -> None:
        self.tried[i].append((code, text))

    def offer(self, i: int, raw: str | None, source: str) -> None:
        """A source's raw caption for clip ``i``: kept once cleaned, else recorded as an empty attempt."""
        text = clean_dataset_caption(raw, t5_clean=self.t5_clean)
        if text is None:
            self.tried[i].append(_empty_attempt(raw, source))
        else:
            self.results[i] = CaptionRow(str(self.rows[i][self.columns.id]), text, source)

    def rows_out(self) -> Iterable[CaptionRow]:
        for i, result in enumerate(self.results):
            yield result if result is not None else _uncaptioned(str(self.rows[i][self.columns.id]), self.tried[i])


def _caption_from_sidecars(attempts: _Attempts, pending: list[int], sidecars: SidecarCaptions, batch_dir: Path) -> None:
    columns = attempts.columns
    for i in pending:
        row = attempts.rows[i]
        key = _video_key(str(row[columns.video_path]), batch_dir)
        found = sidecars.lookup(key, row.get(columns.start_s), row.get(columns.end_s))
        if found is None:
            attempts.failed(i, "no_source", f"no sidecar caption for {key}")
        else:
            attempts.offer(i, found.text, found.source)


def _caption_with_model(attempts: _Attempts, pending: list[int], captioner: Captioner | None,
                        frames_loader: FramesLoader | None, progress: Callable[[str], None] | None) -> None:
    """Caption the pending clips in batches of ``captioner.batch_size``; a clip without kept frames is not shown."""
    if captioner is None:
        for i in pending:
            attempts.failed(i, "no_source", "no captioner model configured")
        return
    label = f"model:{captioner.name}"
    for start in range(0, len(pending), captioner.batch_size):
        chunk = pending[start : start + captioner.batch_size]
        frames = [list(frames_loader(attempts.rows[i])) for i in chunk]
        with_frames = [(i, f) for i, f in zip(chunk, frames) if f]
        for i, f in zip(chunk, frames):
            if not f:
                attempts.failed(i, "no_frames", "no frames kept for the clip")
        raw = captioner.caption([f for _, f in with_frames]) if with_frames else []
        if len(raw) != len(with_frames):
            raise RuntimeError(f"{label} returned {len(raw)} captions for {len(with_frames)} clips")
        for (i, _), text_raw in zip(with_frames, raw):
            attempts.offer(i, text_raw, label)
        if progress:
            progress(f"{label}: captioned {min(start + len(chunk), len(pending))}/{len(pending)} clips")


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
    "CaptionResult",
    "CaptionRow",
    "Captioner",
    "REASON_CODES",
    "ClipColumns",
    "caption_clips",
    "caption_counts",
    "caption_table",
    "clean_dataset_caption",
]
