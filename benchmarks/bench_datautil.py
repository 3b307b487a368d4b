"""Claim: every ``opensora-dag data`` operation takes under 2 s on a million-row Open-Sora table (2 CPU cores),
and filter + dedupe beats the straightforward pandas script the reference's datautil amounts to.

Generates a seeded synthetic table (10% duplicate paths, realistic score distributions) as Parquet and CSV in a
temporary folder, times info / merge (two halves) / dedupe / stats / filter on both formats, then times a pandas
filter + dedupe (read, boolean mask, ``drop_duplicates``, write) against ours on the same file, and prints ratios.
Times are the best of ``--repeat`` runs, since the machine may be shared; the CPU seconds of that run (all
threads) are printed beside it, and the load average, so a busy machine shows for what it is.

    .venv/bin/python benchmarks/bench_datautil.py [--rows 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation import datautil  # noqa: E402

TARGET_S = 2.0
FILTER = dict(fmin=16, hwmax=921600, aesmin=5.0, flowmin=0.5, matchmin=20.0)


def synthetic_table(rows: int, seed: int = 0) -> pl.DataFrame:
    """An Open-Sora data table with the reference's columns plus ids; ~10% of paths repeat."""
    rng = np.random.default_rng(seed)
    clip = rng.integers(0, int(rows * 0.9), rows)
    ids = pl.Series("id", clip).map_elements(lambda x: f"{x:012x}", return_dtype=pl.String)
    heights = np.array([144, 240, 360, 480, 720, 1080])
    widths = np.array([256, 426, 640, 854, 1280, 1920])
    k = rng.integers(0, 6, rows)
    words = [
        np.array(["red", "blue", "green", "small", "large", "quiet", "busy", "old"]),
        np.array(["cat", "dog", "street", "city", "forest", "ocean", "car", "crowd"]),
        np.array(["static", "panning", "zooming in", "tilting"]),
    ]
    frame = pl.DataFrame(
        {
            "id": ids,
            "a": words[0][rng.integers(0, 8, rows)],
            "b": words[1][rng.integers(0, 8, rows)],
            "c": words[2][rng.integers(0, 4, rows)],
            "n": rng.integers(0, 1000, rows),
            "num_frames": rng.integers(1, 400, rows).astype(np.int32),
            "height": heights[k].astype(np.int32),
            "width": widths[np.clip(k + rng.integers(-1, 2, rows), 0, 5)].astype(np.int32),
            "fps": rng.choice([24.0, 25.0, 30.0, 60.0], rows),
            "aes": rng.normal(5.0, 0.8, rows),
            "flow": rng.gamma(2.0, 2.0, rows),
            "ocr": rng.poisson(1.0, rows).astype(np.int32),
            "match": rng.normal(25.0, 4.0, rows),
        }
    )
    return frame.select(
        pl.format("media/clips/{}.mp4", "id").alias("path"),
        pl.format("a {} {} moving across a wide open scene, the camera is {}, take {}", "a", "b", "c", "n").alias("text"),
        "num_frames", "height", "width",
        (pl.col("height") / pl.col("width")).alias("aspect_ratio"),
        "fps",
        (pl.col("height") * pl.col("width")).alias("resolution"),
        "aes", "flow", "ocr", "match", "id",
    )  # fmt: skip


def best_of(fn, repeat: int) -> tuple[float, float]:
    """Best wall-clock seconds and the CPU seconds (all threads) of that run.

    CPU time is what a shared machine cannot inflate: on an idle 2-core box, wall ~ CPU / 2 for the parallel parts.
    """
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        run = (time.perf_counter() - wall, time.process_time() - cpu)
        best = min(best, run)
    return best


def pandas_filter_dedupe(src: Path, dst: Path) -> int:
    """The straightforward pandas version of ``filter`` then ``dedupe --subset path``."""
    import pandas as pd

    df = pd.read_parquet(src) if src.suffix == ".parquet" else pd.read_csv(src, dtype={"id": str, "path": str})
    df = df[df["num_frames"] >= FILTER["fmin"]]
    df = df[df["height"] * df["width"] <= FILTER["hwmax"]]
    df = df[df["aes"] >= FILTER["aesmin"]]
    df = df[df["flow"] >= FILTER["flowmin"]]
    df = df[df["match"] >= FILTER["matchmin"]]
    df = df.drop_duplicates(subset=["path"])
    if dst.suffix == ".parquet":
        df.to_parquet(dst, index=False)
    else:
        df.to_csv(dst, index=False)
    return len(df)


def ours_filter_dedupe(src: Path, dst: Path) -> int:
    mid = dst.with_name("mid" + dst.suffix)
    datautil.filter(src, mid, **FILTER)
    return datautil.dedupe(mid, dst, subset=("path",)).rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped into a log: print tables whole
    with tempfile.TemporaryDirectory(prefix="bench_datautil_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        table = synthetic_table(args.rows)
        half = args.rows // 2
        for ext in ("parquet", "csv"):
            write = pl.DataFrame.write_parquet if ext == "parquet" else pl.DataFrame.write_csv
            write(table, root / f"full.{ext}")
            write(table.slice(0, half), root / f"a.{ext}")
            write(table.slice(half), root / f"b.{ext}")
        sizes = {ext: (root / f"full.{ext}").stat().st_size / 2**20 for ext in ("parquet", "csv")}
        console.print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} before timing")
        console.print(
            f"{args.rows:,} rows generated in {time.perf_counter() - start:.1f}s "
            f"(parquet {sizes['parquet']:.0f} MiB, csv {sizes['csv']:.0f} MiB); best of {args.repeat}"
        )

        ops = Table(title=f"datautil on {args.rows:,} rows (target < {TARGET_S:g} s per op)")
        for name in ("op", "format", "wall s", "cpu s", "rows out", "< 2 s"):
            ops.add_column(name, justify="left" if name in ("op", "format") else "right")
        for ext in ("parquet", "csv"):
            full, out = root / f"full.{ext}", root / f"out.{ext}"
            runs = {
                "info": lambda: datautil.info(full).rows,
                "merge (2 halves)": lambda: datautil.merge([root / f"a.{ext}", root / f"b.{ext}"], out).rows_out,
                "dedupe (path)": lambda: datautil.dedupe(full, out).rows_out,
                "stats": lambda: datautil.stats(full).height,
                "filter": lambda: datautil.filter(full, out, **FILTER).rows_out,
            }
            for name, fn in runs.items():
                rows_out = fn()
                seconds, cpu = best_of(fn, args.repeat)
                ok = "[green]yes" if seconds < TARGET_S else "[red]no"
                ops.add_row(name, ext, f"{seconds:.3f}", f"{cpu:.3f}", f"{rows_out:,}", ok)
        console.print(ops)
        console.print(f"load average {os.getloadavg()[0]:.1f} after timing")

        ratios = Table(title="filter + dedupe: pandas baseline vs datautil (same input, same output format)")
        for name in ("format", "pandas wall s", "datautil wall s", "speed-up (wall)", "cpu ratio", "rows pandas / ours"):
            ratios.add_column(name, justify="left" if name == "format" else "right")
        for ext in ("parquet", "csv"):
            full = root / f"full.{ext}"
            n_pd = pandas_filter_dedupe(full, root / f"pd.{ext}")
            n_ours = ours_filter_dedupe(full, root / f"ours.{ext}")
            t_pd, c_pd = best_of(lambda: pandas_filter_dedupe(full, root / f"pd.{ext}"), args.repeat)
            t_ours, c_ours = best_of(lambda: ours_filter_dedupe(full, root / f"ours.{ext}"), args.repeat)
            ratios.add_row(
                ext, f"{t_pd:.3f}", f"{t_ours:.3f}", f"{t_pd / t_ours:.1f}x", f"{c_pd / c_ours:.1f}x",
                f"{n_pd:,} / {n_ours:,}",
            )  # fmt: skip
        console.print(ratios)


if __name__ == "__main__":
    main()
