"""The clip filter: one set of criteria with one meaning, used by ``opensora-dag data filter`` and ``curated_dataset``.

A criterion keeps a row when ``column <op> bound`` holds (``>=`` or ``<=``, bounds inclusive). It is **active**
when the spec sets its bound and does not list it in ``skip``; only the spec decides. A row whose value is missing
(NULL: never scored, scorer without weights, table absent) fails an active criterion, as in the reference's datautil
(pandas' ``NaN >= 5`` is False), and is dropped with that reason: a missing score never passes a filter silently.

Names: each criterion has a spec field name (``min_frames``; the drop reason in dataset versions) and a CLI flag
(``--fmin``: the reference's flag names, plus ``--hwmin``, ``--fpsmin``, ``--fpsmax`` for the spec's other bounds).
``FilterSpec.from_flags`` turns flags into a spec; both front ends build their SQL with the functions below.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


@dataclass(frozen=True)
class Criterion:
    """One filter bound: keep a row when ``column <op> spec.<name>``."""

    name: str  # FilterSpec field, and the drop reason of a row that fails it
    flag: str  # the CLI flag (without --)
    column: str
    op: str  # ">=" or "<="
    help: str


# The fixed order drops are attributed in: each dropped row is counted once, at the first criterion it fails.
CRITERIA = (
    Criterion("min_frames", "fmin", "num_frames", ">=", "keep rows with num_frames >= FMIN"),
    Criterion("max_frames", "fmax", "num_frames", "<=", "keep rows with num_frames <= FMAX"),
    Criterion("min_resolution", "hwmin", "resolution", ">=", "keep rows with height*width >= HWMIN (uses 'resolution' if present)"),
    Criterion("max_resolution", "hwmax", "resolution", "<=", "keep rows with height*width <= HWMAX (uses 'resolution' if present)"),
    Criterion("fpsmin", "fpsmin", "fps", ">=", "keep rows with fps >= FPSMIN"),
    Criterion("fpsmax", "fpsmax", "fps", "<=", "keep rows with fps <= FPSMAX"),
    Criterion("aesmin", "aesmin", "aes", ">=", "keep rows with aesthetic score aes >= AESMIN"),
    Criterion("flowmin", "flowmin", "flow", ">=", "keep rows with optical-flow score flow >= FLOWMIN"),
    Criterion("flowmax", "flowmax", "flow", "<=", "keep rows with flow <= FLOWMAX"),
    Criterion("ocrmax", "ocrmax", "ocr", "<=", "keep rows with at most OCRMAX text boxes"),
    Criterion("matchmin", "matchmin", "match", ">=", "keep rows with text-image match score >= MATCHMIN"),
)  # fmt: skip
CRITERION_BY_NAME = {c.name: c for c in CRITERIA}
CRITERION_BY_FLAG = {c.flag: c for c in CRITERIA}


def _criterion(name_or_flag: str) -> Criterion:
    if name_or_flag in CRITERION_BY_NAME:
        return CRITERION_BY_NAME[name_or_flag]
    if name_or_flag in CRITERION_BY_FLAG:
        return CRITERION_BY_FLAG[name_or_flag]
    raise ValueError(f"unknown filter criterion {name_or_flag!r}; one of {', '.join(CRITERION_BY_NAME)} "
                     f"(or the flags {', '.join(CRITERION_BY_FLAG)})")  # fmt: skip


class FilterSpec(BaseModel):
    """Which clips go into a curated dataset. Every bound is inclusive and optional (None: not applied).

    A clip whose value is missing fails a bound that is applied. ``skip`` lists criteria that are set but not
    applied (e.g. the demo has no CLIP weights, so it skips ``aesmin`` and ``matchmin``); every skip is reported.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_frames: int | None = Field(None, ge=1, description="keep clips with num_frames >= this")
    max_frames: int | None = Field(None, ge=1, description="keep clips with num_frames <= this")
    min_resolution: int | None = Field(None, ge=1, description="keep clips with height*width >= this (pixels)")
    max_resolution: int | None = Field(None, ge=1, description="keep clips with height*width <= this (pixels)")
    fpsmin: float | None = Field(None, ge=0, description="keep clips with fps >= this")
    fpsmax: float | None = Field(None, ge=0, description="keep clips with fps <= this")
    aesmin: float | None = Field(None, description="keep clips with aesthetic score >= this (reference: 5)")
    flowmin: float | None = Field(None, ge=0, description="keep clips with optical-flow score >= this")
    flowmax: float | None = Field(None, ge=0, description="keep clips with optical-flow score <= this")
    ocrmax: float | None = Field(None, ge=0, description="keep clips with at most this many OCR text boxes")
    matchmin: float | None = Field(None, description="keep clips with CLIP text-frame match (100*cos) >= this")
    skip: tuple[str, ...] = Field(
        (), description="criteria (names or CLI flags) that are set but deliberately not applied; each is reported"
    )
    dedupe: bool = Field(
        True, description="keep one row per clip id (same content landed in two batches): first batch, then path"
    )
    require_caption: bool = Field(True, description="drop clips without a non-empty caption (training needs text)")

    @field_validator("skip", mode="before")
    @classmethod
    def _normalize_skip(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        names = {_criterion(str(v)).name for v in value}
        return tuple(c.name for c in CRITERIA if c.name in names)  # canonical: criteria order, no repeats

    @model_validator(mode="after")
    def _check(self) -> FilterSpec:
        for lo, hi in (("min_frames", "max_frames"), ("min_resolution", "max_resolution"),
                       ("fpsmin", "fpsmax"), ("flowmin", "flowmax")):  # fmt: skip
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{lo}={a} is greater than {hi}={b}: no clip could pass")
        unset = [name for name in self.skip if getattr(self, name) is None]
        if unset:
            raise ValueError(f"skip lists {unset}, which the spec does not set: only a set bound can be skipped")
        return self

    @classmethod
    def from_flags(cls, **flags: float | None) -> FilterSpec:
        """A spec from CLI flag values (``fmin=48, aesmin=5``); ``None`` means the flag was not given."""
        import math

        fields: dict[str, Any] = {}
        for flag, value in flags.items():
            if flag not in CRITERION_BY_FLAG:
                raise TypeError(f"unknown filter flag {flag!r}; one of {', '.join(CRITERION_BY_FLAG)}")
            if value is None:
                continue
            criterion = CRITERION_BY_FLAG[flag]
            if criterion.name in _INTEGER_FIELDS:  # integer columns: --fmin 47.5 keeps the same rows as 48
                value = math.ceil(value) if criterion.op == ">=" else math.floor(value)
            fields[criterion.name] = value
        return cls(**fields, dedupe=False, require_caption=False)

    def bound(self, criterion: Criterion) -> float | None:
        value = getattr(self, criterion.name)
        return None if value is None else float(value)

    def active(self) -> list[tuple[Criterion, float]]:
        """(criterion, bound) of every criterion this spec applies, in ``CRITERIA`` order."""
        return [(c, self.bound(c)) for c in CRITERIA if getattr(self, c.name) is not None and c.name not in self.skip]

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


_INTEGER_FIELDS = ("min_frames", "max_frames", "min_resolution", "max_resolution")

# Named specs, usable as CLI / launchpad choices.
PRESETS: dict[str, FilterSpec] = {
    "all": FilterSpec(),
    # The reference's curation recipe keeps aes >= 5 (report section 4).
    "reference": FilterSpec(aesmin=5.0),
    # Trainable clips for the bucket sampler: at least 16 frames at 144p or more, some motion, little text.
    "train": FilterSpec(min_frames=16, min_resolution=144 * 256, aesmin=5.0, flowmin=0.5, ocrmax=5),
    # `make demo`: the reference's aesthetic bound and a caption-match bound, both skipped on purpose: the demo has
    # no CLIP / aesthetic weights, so both columns are null (with the reason) and would otherwise drop every clip.
    "demo": FilterSpec(aesmin=5.0, matchmin=20.0, skip=("aesmin", "matchmin")),
}


# ---- SQL ---------------------------------------------------------------------------------------------------------
def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_str(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def resolution_sql(columns: Collection[str], prefix: str = "") -> str | None:
    """The pixel count of a row: its ``resolution`` where present, else ``height * width``; None if neither exists."""
    hw = (f"(CAST({prefix}height AS BIGINT) * CAST({prefix}width AS BIGINT))"
          if "height" in columns and "width" in columns else None)  # fmt: skip
    if "resolution" in columns:
        res = f"CAST({prefix}resolution AS BIGINT)"
        return f"coalesce({res}, {hw})" if hw else res
    return hw


def value_sql(criterion: Criterion, columns: Collection[str]) -> str | None:
    """The SQL value a criterion compares, or None when the table has no column to compute it from."""
    if criterion.column == "resolution":
        return resolution_sql(columns)
    return ident(criterion.column) if criterion.column in columns else None


def passes_sql(criterion: Criterion, bound: float, value: str) -> str:
    """True when the row passes; NULL when the value is missing (a WHERE drops it, like a failure)."""
    return f"{value} {criterion.op} {float(bound)!r}"


def keep_sql(active: Sequence[tuple[Criterion, float]], values: Mapping[str, str]) -> str:
    """A WHERE condition keeping exactly the rows that pass every active criterion (a missing value fails)."""
    return " AND ".join(passes_sql(c, bound, values[c.name]) for c, bound in active) or "true"


def first_failure_sql(
    active: Sequence[tuple[Criterion, float]], values: Mapping[str, str], leading: Sequence[str] = (),
    as_position: bool = False,
) -> str:
    """A CASE giving the name of the first active criterion a row fails (a missing value fails), else NULL.

    ``leading``: ``WHEN ... THEN ...`` clauses checked before the criteria (the dataset's "no caption").
    ``as_position``: give the criterion's index in ``active`` instead of its name (for counting).
    """
    cases = list(leading)
    for k, (c, bound) in enumerate(active):
        then = str(k) if as_position else sql_str(c.name)
        cases.append(f"WHEN NOT coalesce({passes_sql(c, bound, values[c.name])}, false) THEN {then}")
    if cases:
        return f"CASE {' '.join(cases)} ELSE NULL END"
    return "CAST(NULL AS INTEGER)" if as_position else "CAST(NULL AS VARCHAR)"


def failure_detail_sql(
    active: Sequence[tuple[Criterion, float]], values: Mapping[str, str], reason: str,
    null_reasons: Mapping[str, str] | None = None,
) -> str:
    """Why a row failed the criterion named by the SQL expression ``reason``: ``no aes value: <why it is null>`` or
    ``aes 4.2 fails >= 5.0``. ``null_reasons``: criterion name -> SQL expression saying why its value is null."""
    null_reasons = null_reasons or {}
    cases = []
    for c, bound in active:
        value = values[c.name]
        why = null_reasons.get(c.name)
        missing = sql_str(f"no {c.column} value") + (f" || coalesce(': ' || {why}, '')" if why else "")
        present = f"{sql_str(c.column + ' ')} || CAST({value} AS VARCHAR) || {sql_str(f' fails {c.op} {bound!r}')}"
        cases.append(f"WHEN {reason} = {sql_str(c.name)} THEN CASE WHEN {value} IS NULL THEN {missing} ELSE {present} END")
    return f"CASE {' '.join(cases)} ELSE {reason} END" if cases else reason


__all__ = [
    "CRITERIA", "CRITERION_BY_FLAG", "CRITERION_BY_NAME", "Criterion", "FilterSpec", "PRESETS", "failure_detail_sql",
    "first_failure_sql", "keep_sql", "passes_sql", "resolution_sql", "value_sql",
]  # fmt: skip
