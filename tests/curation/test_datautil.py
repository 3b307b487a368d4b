"""datautil on small CSV and Parquet tables whose answers are known by hand."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest

from curation import datautil, datautil_cli
from curation.datautil import DatautilError

FORMATS = ["csv", "parquet"]


def sample_table() -> pl.DataFrame:
    """Six rows: two share a path (b.mp4), one has no aes, ids look numeric but are strings."""
    return pl.DataFrame(
        {
            "path": ["a.mp4", "b.mp4", "c.mp4", "b.mp4", "d.mp4", "e.mp4"],
            "text": ["a cat", "a dog", "a car", "a dog again", "a cat", "sea"],
            "num_frames": [10, 20, 30, 40, 50, 60],
            "height": [240, 480, 720, 1080, 240, 720],
            "width": [426, 854, 1280, 1920, 426, 1280],
            "fps": [24.0, 30.0, 30.0, 60.0, 25.0, 30.0],
            "aes": [4.0, 5.0, 6.0, None, 5.5, 4.9],
            "flow": [0.1, 2.0, 8.0, 3.0, 0.0, 12.0],
            "ocr": [0, 1, 5, 0, 2, 0],
            "match": [20.0, 25.0, 30.0, 21.0, 19.0, 28.0],
            "id": ["0001", "12345", "0003", "12345", "0005", "0006"],
        }
    )


def write(frame: pl.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.write_csv(path)
    else:
        frame.write_parquet(path)
    return path


def read(path: Path) -> pl.DataFrame:
    """Read back with ids as strings (a CSV reader would otherwise turn "12345" into a number)."""
    if path.suffix == ".csv":
        return pl.read_csv(path, schema_overrides={"id": pl.String})
    return pl.read_parquet(path)


@pytest.fixture(params=FORMATS)
def table_path(request, tmp_path: Path) -> Path:
    return write(sample_table(), tmp_path / f"data.{request.param}")


# ---- info ----------------------------------------------------------------------------------------------------------
def test_info_counts_rows_nulls_and_ranges(table_path: Path):
    result = datautil.info(table_path)
    assert result.rows == 6
    assert result.format == table_path.suffix[1:]
    assert [c.name for c in result.columns] == sample_table().columns
    aes = result.column("aes")
    assert (aes.non_null, aes.nulls) == (5, 1)
    assert aes.min == pytest.approx(4.0) and aes.max == pytest.approx(6.0)
    assert aes.mean == pytest.approx((4.0 + 5.0 + 6.0 + 5.5 + 4.9) / 5)
    frames = result.column("num_frames")
    assert (frames.min, frames.max, frames.mean) == (10, 60, pytest.approx(35.0))
    assert result.column("id").dtype == "VARCHAR"  # "12345" stays a string even in CSV
    assert result.column("text").mean is None
    assert result.missing_required == []
    assert result.missing_video_info == 0


def test_info_reports_rows_it_cannot_probe(tmp_path: Path):
    frame = pl.DataFrame({"path": ["x.mp4", "y.mp4", "z.mp4"], "num_frames": [5, None, 7]})
    result = datautil.info(write(frame, tmp_path / "t.csv"))
    assert result.missing_required == ["text"]
    assert result.missing_video_info == 3  # no height/width columns: nothing is known about any row

    frame = frame.with_columns(height=pl.lit(240), width=pl.Series([426, 426, None]))
    result = datautil.info(write(frame, tmp_path / "t.parquet"))
    assert result.missing_video_info == 2  # row 2 lacks num_frames, row 3 lacks width


# ---- merge ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_fmt", FORMATS)
@pytest.mark.parametrize("in_fmts", [("csv", "csv"), ("parquet", "parquet"), ("csv", "parquet")])
def test_merge_unions_by_name_in_order(tmp_path: Path, in_fmts, out_fmt):
    first = sample_table().slice(0, 4)
    second = sample_table().slice(4).drop("ocr").select(["id", "path", "text", "num_frames", "aes"])  # other order
    a = write(first, tmp_path / f"a.{in_fmts[0]}")
    b = write(second, tmp_path / f"b.{in_fmts[1]}")
    result = datautil.merge([a, b], tmp_path / f"m.{out_fmt}")
    assert result.rows_out == 6
    merged = read(tmp_path / f"m.{out_fmt}")
    assert merged.columns[:3] == ["path", "text", "num_frames"]  # first input's column order
    assert merged["path"].to_list() == sample_table()["path"].to_list()
    assert merged["id"].to_list() == sample_table()["id"].to_list()
    assert merged["ocr"].to_list() == [0, 1, 5, 0, None, None]  # missing in the second input
    assert merged["height"].null_count() == 2


def test_merge_rejects_unknown_extension(tmp_path: Path):
    a = write(sample_table(), tmp_path / "a.csv")
    with pytest.raises(DatautilError, match="unknown extension"):
        datautil.merge([a], tmp_path / "m.xlsx")
    with pytest.raises(DatautilError, match="no such file"):
        datautil.merge([a, tmp_path / "missing.parquet"], tmp_path / "m.csv")


# ---- dedupe --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_fmt", FORMATS)
def test_dedupe_by_path_keeps_first_in_order(table_path: Path, tmp_path: Path, out_fmt):
    result = datautil.dedupe(table_path, tmp_path / f"d.{out_fmt}")
    assert (result.rows_in, result.rows_out, result.dropped) == (6, 5, 1)
    kept = read(tmp_path / f"d.{out_fmt}")
    assert kept["path"].to_list() == ["a.mp4", "b.mp4", "c.mp4", "d.mp4", "e.mp4"]
    assert kept.filter(pl.col("path") == "b.mp4")["text"].item() == "a dog"  # the first of the two b rows


def test_dedupe_by_text_and_by_id(table_path: Path, tmp_path: Path):
    by_text = datautil.dedupe(table_path, tmp_path / "t.parquet", subset=["text"])
    assert by_text.rows_out == 5
    assert read(tmp_path / "t.parquet")["path"].to_list() == ["a.mp4", "b.mp4", "c.mp4", "b.mp4", "e.mp4"]
    by_id = datautil.dedupe(table_path, tmp_path / "i.csv", subset=("id",))
    assert by_id.rows_out == 5
    assert read(tmp_path / "i.csv")["id"].to_list() == ["0001", "12345", "0003", "0005", "0006"]


def test_dedupe_missing_key_column(table_path: Path, tmp_path: Path):
    with pytest.raises(DatautilError, match="video_id"):
        datautil.dedupe(table_path, tmp_path / "d.csv", subset=["video_id"])


# ---- stats ---------------------------------------------------------------------------------------------------------
def test_stats_match_hand_computed_values(table_path: Path):
    frame = datautil.stats(table_path)
    assert frame.columns == ["column", "count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    rows = {r["column"]: r for r in frame.iter_rows(named=True)}
    # fixed order of the Open-Sora columns present; aspect_ratio / resolution absent from the input
    assert list(rows) == ["num_frames", "height", "width", "fps", "text_len", "aes", "flow", "ocr", "match"]
    nf = rows["num_frames"]
    assert nf["count"] == 6 and nf["mean"] == pytest.approx(35.0)
    assert nf["std"] == pytest.approx(math.sqrt(sum((x - 35) ** 2 for x in (10, 20, 30, 40, 50, 60)) / 5))
    # linear interpolation, as pandas' describe(): positions 1.25, 2.5, 3.75 of 10..60
    assert (nf["min"], nf["25%"], nf["50%"], nf["75%"], nf["max"]) == (10, 22.5, 35, 47.5, 60)
    assert rows["aes"]["count"] == 5  # the missing score is not a zero
    assert rows["aes"]["50%"] == pytest.approx(5.0)
    lengths = [len(t) for t in sample_table()["text"]]
    assert rows["text_len"]["max"] == max(lengths) and rows["text_len"]["min"] == min(lengths)


def test_stats_without_numeric_columns(tmp_path: Path):
    path = write(pl.DataFrame({"path": ["a.mp4"]}), tmp_path / "p.csv")
    with pytest.raises(DatautilError, match="none of the Open-Sora numeric columns"):
        datautil.stats(path)


# ---- filter --------------------------------------------------------------------------------------------------------
# Rows of sample_table(): path a b c b d e ; expected surviving row numbers per flag (bounds inclusive).
FLAG_CASES = [
    ({"fmin": 30}, [2, 3, 4, 5]),
    ({"fmax": 30}, [0, 1, 2]),
    ({"fmin": 20, "fmax": 40}, [1, 2, 3]),
    ({"hwmax": 480 * 854}, [0, 1, 4]),
    ({"aesmin": 5.0}, [1, 2, 4]),  # row 3 has no aes: dropped, as pandas' NaN >= 5 is False
    ({"flowmin": 2.0}, [1, 2, 3, 5]),
    ({"flowmax": 3.0}, [0, 1, 3, 4]),
    ({"matchmin": 21.0}, [1, 2, 3, 5]),
    ({"ocrmax": 1}, [0, 1, 3, 5]),
    ({"fpsmin": 30}, [1, 2, 3, 5]),
    ({"fpsmax": 25}, [0, 4]),
    ({"aesmin": 5.0, "flowmin": 2.0, "matchmin": 26.0}, [2]),
    ({}, [0, 1, 2, 3, 4, 5]),
]


@pytest.mark.parametrize("bounds,kept", FLAG_CASES, ids=[str(b) for b, _ in FLAG_CASES])
def test_filter_flag_semantics(table_path: Path, tmp_path: Path, bounds, kept):
    out = tmp_path / f"f{table_path.suffix}"
    result = datautil.filter(table_path, out, **bounds)
    assert (result.rows_in, result.rows_out) == (6, len(kept))
    assert read(out)["id"].to_list() == [sample_table()["id"][i] for i in kept]


def test_filter_hwmax_prefers_resolution_column(tmp_path: Path):
    frame = sample_table().with_columns(resolution=pl.Series([1, 10**9, 1, 10**9, 1, 1]))
    path = write(frame, tmp_path / "r.parquet")
    datautil.filter(path, tmp_path / "o.parquet", hwmax=1000)
    assert read(tmp_path / "o.parquet")["path"].to_list() == ["a.mp4", "c.mp4", "d.mp4", "e.mp4"]


def test_filter_converts_format_and_runs_in_place(tmp_path: Path):
    src = write(sample_table(), tmp_path / "in.csv")
    datautil.filter(src, tmp_path / "out.parquet", fmin=30)
    assert pl.read_parquet(tmp_path / "out.parquet")["id"].dtype == pl.String
    result = datautil.filter(src, src, fmin=30)  # output == input: written beside it, then renamed
    assert result.rows_out == 4 and read(src).height == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.parquet"]  # no temp files left


def test_filter_missing_column_is_a_user_error(tmp_path: Path):
    path = write(sample_table().drop("aes", "height"), tmp_path / "t.parquet")
    with pytest.raises(DatautilError, match="--aesmin needs column"):
        datautil.filter(path, tmp_path / "o.parquet", aesmin=5)
    with pytest.raises(DatautilError, match="hwmax"):
        datautil.filter(path, tmp_path / "o.parquet", hwmax=5)
    assert not (tmp_path / "o.parquet").exists()


# ---- CLI -----------------------------------------------------------------------------------------------------------
def test_main_filter_writes_output(tmp_path: Path, capsys):
    src = write(sample_table(), tmp_path / "in.parquet")
    out = tmp_path / "sub" / "out.csv"
    code = datautil_cli.main(["filter", str(src), "-o", str(out), "--fmin", "20", "--aesmin", "5"])
    assert code == 0
    assert read(out)["id"].to_list() == ["12345", "0003", "0005"]
    assert "6 -> 3 rows" in capsys.readouterr().out


def test_main_accepts_leading_data_word(tmp_path: Path, capsys):
    src = write(sample_table(), tmp_path / "in.csv")
    assert datautil_cli.main(["data", "info", str(src)]) == 0
    out = capsys.readouterr().out
    assert "num_frames" in out and "6 rows" in out
    assert datautil_cli.main(["stats", str(src), "-o", str(tmp_path / "s.csv")]) == 0
    assert pl.read_csv(tmp_path / "s.csv")["column"][0] == "num_frames"
    assert datautil_cli.main(["dedupe", str(src), "-o", str(tmp_path / "d.parquet"), "--subset", "path"]) == 0
    assert pl.read_parquet(tmp_path / "d.parquet").height == 5
    assert datautil_cli.main(["merge", str(src), str(src), "-o", str(tmp_path / "m.csv")]) == 0
    assert pl.read_csv(tmp_path / "m.csv").height == 12


@pytest.mark.parametrize(
    "argv,message",
    [
        (["filter", "{src}", "-o", "{tmp}/o.parquet", "--flowmin", "1"], "needs column"),
        (["filter", "{src}", "-o", "{tmp}/o.txt", "--fmin", "1"], "unknown extension"),
        (["info", "{tmp}/nope.parquet"], "no such file"),
        (["info", "{tmp}/table.json"], "unknown extension"),
        (["dedupe", "{src}", "-o", "{tmp}/o.csv", "--subset", "video_id"], "needs column"),
        (["info", "{tmp}/broken.parquet"], "error reading input"),
    ],
)
def test_main_bad_input_exits_2(tmp_path: Path, capsys, argv, message):
    src = write(sample_table().drop("flow"), tmp_path / "in.csv")
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file")
    code = datautil_cli.main([a.format(src=src, tmp=tmp_path) for a in argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_main_usage_errors_exit_2(capsys):
    assert datautil_cli.main([]) == 2
    assert datautil_cli.main(["filter", "x.csv"]) == 2  # -o is required
    assert datautil_cli.main(["filter", "x.csv", "-o", "y.csv", "--fmin", "many"]) == 2
    assert datautil_cli.main(["--help"]) == 0
    assert "info" in capsys.readouterr().out


def test_filter_takes_output_as_positional_argument(tmp_path):
    """`data filter INPUT OUTPUT --fmin ...`, the reference's form; -o still works; both at once is an error."""
    import polars as pl

    from curation.datautil_cli import main

    src = tmp_path / "in.csv"
    pl.DataFrame({"path": ["a", "b", "c"], "text": ["x", "y", "z"], "num_frames": [10, 50, 90]}).write_csv(src)
    assert main(["filter", str(src), str(tmp_path / "out.parquet"), "--fmin", "40"]) == 0
    assert pl.read_parquet(tmp_path / "out.parquet")["path"].to_list() == ["b", "c"]
    assert main(["filter", str(src), "-o", str(tmp_path / "o2.csv"), "--fmax", "50"]) == 0
    assert pl.read_csv(tmp_path / "o2.csv")["path"].to_list() == ["a", "b"]
    assert main(["filter", str(src), str(tmp_path / "x.csv"), "-o", str(tmp_path / "y.csv")]) == 2
    assert main(["dedupe", str(src), str(tmp_path / "d.csv")]) == 0


# ---- one filter: the CLI and the curated dataset ---------------------------------------------------------------------
def _as_lake_tables(frame: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """The same rows as the curated dataset's input tables (clips + one table per score, keyed by id)."""
    return {
        "clips": frame.select("id", "path", "num_frames", "height", "width", "fps"),
        "aesthetic_scores": frame.select("id", "aes"),
        "motion_scores": frame.select("id", "flow"),
        "ocr_scores": frame.select("id", "ocr"),
        "match_scores": frame.select("id", "match"),
        "captions": frame.select("id", "text"),
    }


AGREE_CASES = FLAG_CASES + [({"hwmin": 480 * 854, "fpsmax": 30}, [1, 2, 5]), ({"aesmin": 0.0, "_null": "aes"}, [])]


@pytest.mark.parametrize("bounds,kept", AGREE_CASES, ids=[str(b) for b, _ in AGREE_CASES])
def test_cli_filter_and_dataset_filter_are_one_filter(tmp_path: Path, bounds, kept):
    """Same flags, same rows kept and the same drop counts from `data filter` and from the dataset builder; a
    column with no value at all (a scorer without weights) fails its criterion in both."""
    from curation.datasets import build_dataset
    from curation.filters import CRITERION_BY_FLAG, FilterSpec

    bounds = dict(bounds)
    frame = sample_table().with_columns(id=pl.Series([f"r{i}" for i in range(6)]))  # one row per id
    if null_column := bounds.pop("_null", None):
        frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(null_column))
    path = write(frame, tmp_path / "in.parquet")
    cli = datautil.filter(path, tmp_path / "out.parquet", **bounds)
    assert read(tmp_path / "out.parquet")["id"].to_list() == [f"r{i}" for i in kept]

    spec = FilterSpec.from_flags(**bounds)
    built = build_dataset(_as_lake_tables(frame), spec, {"clips": "t"}, tmp_path / "datasets")
    assert sorted(pl.read_parquet(built.data_path)["id"].to_list()) == [f"r{i}" for i in kept]
    assert {CRITERION_BY_FLAG[flag].name: n for flag, n in cli.drop_counts.items()} == built.drop_counts
    assert built.skipped == []


def test_filter_reports_drops_per_flag_with_missing_values(tmp_path: Path, capsys):
    src = write(sample_table(), tmp_path / "in.parquet")
    result = datautil.filter(src, tmp_path / "o.parquet", fmin=20, aesmin=5.0, dropped=tmp_path / "dropped.csv")
    # a.mp4 fails fmin first; b.mp4 (2nd copy) has no aes; e.mp4 has 4.9.
    assert result.drop_counts == {"fmin": 1, "aesmin": 2} and result.missing_counts == {"fmin": 0, "aesmin": 1}
    dropped = pl.read_csv(tmp_path / "dropped.csv", schema_overrides={"id": pl.String})
    assert dropped.select("path", "drop_reason", "drop_detail").rows() == [
        ("a.mp4", "fmin", "num_frames 10 fails >= 20.0"),
        ("b.mp4", "aesmin", "no aes value"),
        ("e.mp4", "aesmin", "aes 4.9 fails >= 5.0"),
    ]
    assert datautil_cli.main(["filter", str(src), str(tmp_path / "o.csv"), "--aesmin", "5"]) == 0
    assert "6 -> 3 rows (3 dropped: aesmin 3 (1 without a value))" in capsys.readouterr().out
