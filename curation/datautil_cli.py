"""The command line of the table tools: ``opensora-dag data info|merge|dedupe|stats|filter`` (and ``python -m
curation.datautil_cli``).

The operations are ``curation.datautil``; here are their arguments, the tables and summaries printed with rich, and
the exit codes (0 done, 2 bad input). ``opensora-dag data`` adds ``export`` to these ops (it needs the lake).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Sequence

from curation import datautil
from curation.filters import CRITERIA

if TYPE_CHECKING:
    import polars as pl

# ---- filter flags ------------------------------------------------------------------------------------------------
# The criteria live in curation.filters, shared with the curated dataset: one implementation, one meaning. The CLI
# uses their flags (the reference's names: --fmin, --fmax, --hwmax, --aesmin, --matchmin, --flowmin, --flowmax,
# --ocrmax; plus --hwmin, --fpsmin, --fpsmax).
FILTER_FLAGS = CRITERIA

DESCRIPTION = "Inspect and edit Open-Sora data tables (CSV or Parquet)."


def build_parser(prog: str = "opensora-dag data") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser):
    """The ops of ``opensora-dag data`` as sub-commands of ``parser``; returns their subparsers action (``args.op``),
    to which a caller may add more (``export``, which needs the lake)."""
    sub = parser.add_subparsers(dest="op", required=True)

    p = sub.add_parser("info", help="rows, columns and per-column stats of a table")
    p.add_argument("input")

    p = sub.add_parser("merge", help="concatenate tables by column name")
    p.add_argument("inputs", nargs="+")
    p.add_argument("-o", "--output", required=True)

    p = sub.add_parser("dedupe", help="keep the first row per key: dedupe INPUT OUTPUT")
    p.add_argument("input")
    p.add_argument("output_path", nargs="?", metavar="OUTPUT")
    p.add_argument("-o", "--output")
    p.add_argument("--subset", nargs="+", default=["path"], metavar="COLUMN", help="key columns (default: path)")

    p = sub.add_parser("stats", help="distribution of the Open-Sora numeric columns")
    p.add_argument("input")
    p.add_argument("-o", "--output", help="also write the stats table here (.csv or .parquet)")

    p = sub.add_parser("filter", help="keep rows within the given bounds (inclusive): filter INPUT OUTPUT --fmin ...")
    p.add_argument("input")
    p.add_argument("output_path", nargs="?", metavar="OUTPUT")
    p.add_argument("-o", "--output")
    for criterion in FILTER_FLAGS:
        p.add_argument(f"--{criterion.flag}", type=float, default=None, help=criterion.help)
    p.add_argument("--dropped", metavar="FILE", help="also write the dropped rows here, with drop_reason and drop_detail")
    return sub


def _print_info(console, result: datautil.TableInfo) -> None:
    from rich.table import Table

    table = Table(title=f"{result.path}  ({result.format}, {result.rows:,} rows, {len(result.columns)} columns)")
    for name in ("column", "type", "non-null", "nulls", "min", "max", "mean"):
        table.add_column(name, justify="left" if name in ("column", "type") else "right", no_wrap=True)
    for col in result.columns:
        table.add_row(
            col.name, col.dtype, f"{col.non_null:,}", f"{col.nulls:,}",
            _short(col.min), _short(col.max), "" if col.mean is None else f"{col.mean:.4g}",
        )  # fmt: skip
    console.print(table)
    if result.missing_required:
        console.print(f"[yellow]missing Open-Sora required column(s): {', '.join(result.missing_required)}")
    if result.missing_video_info:
        console.print(f"[yellow]{result.missing_video_info:,} row(s) lack num_frames/height/width (not probed)")


def _short(value: Any, width: int = 24) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_stats(console, frame: "pl.DataFrame", title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for name in frame.columns:
        table.add_column(name, justify="left" if name == "column" else "right", no_wrap=True)
    for row in frame.iter_rows():
        table.add_row(*(_short(v) for v in row))
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m curation.datautil_cli``, as ``opensora-dag data ...``; a leading ``"data"`` in ``argv`` is accepted and ignored.

    Exit codes: 0 done, 2 bad input (usage, unknown extension, missing file or column, unreadable table).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "data":
        args_list = args_list[1:]
    try:
        args = build_parser().parse_args(args_list)
    except SystemExit as exit_:  # argparse exits 2 on usage errors and 0 on --help; return it instead
        return int(exit_.code or 0)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """``opensora-dag data OP ...``: 0 done, 2 bad input (see :func:`main`)."""
    import duckdb
    from rich.console import Console

    if args.op in ("dedupe", "filter"):  # OUTPUT as the reference's positional argument, or -o OUTPUT
        if bool(args.output) == bool(args.output_path):
            print(f"error: {args.op} needs exactly one output: {args.op} INPUT OUTPUT (or -o OUTPUT)", file=sys.stderr)
            return 2
        args.output = args.output or args.output_path

    # Tables fit a terminal; piped into a file or a log they are printed whole. Messages never wrap (grep-able).
    console = Console(soft_wrap=True)
    if not console.is_terminal:
        console = Console(soft_wrap=True, width=160)
    try:
        if args.op == "info":
            _print_info(console, datautil.info(args.input))
        elif args.op == "merge":
            result = datautil.merge(args.inputs, args.output)
            console.print(f"merged {len(args.inputs)} table(s): {result.rows_out:,} rows -> {result.output}")
        elif args.op == "dedupe":
            result = datautil.dedupe(args.input, args.output, subset=args.subset)
            console.print(
                f"dedupe by {', '.join(args.subset)}: {result.rows_in:,} -> {result.rows_out:,} rows "
                f"({result.dropped:,} duplicates dropped) -> {result.output}"
            )
        elif args.op == "stats":
            frame = datautil.stats(args.input)
            _print_stats(console, frame, title=f"{args.input}")
            if args.output:
                datautil.write_frame(frame, args.output)
                console.print(f"stats -> {args.output}")
        elif args.op == "filter":
            bounds = {c.flag: getattr(args, c.flag) for c in FILTER_FLAGS}
            result = datautil.filter(args.input, args.output, **bounds, dropped=args.dropped)
            used = ", ".join(f"--{k} {v:g}" for k, v in bounds.items() if v is not None) or "no bounds"
            why = ", ".join(
                f"{flag} {n:,}" + (f" ({result.missing_counts[flag]:,} without a value)" if result.missing_counts.get(flag) else "")
                for flag, n in result.drop_counts.items() if n
            )  # fmt: skip
            console.print(
                f"filter ({used}): {result.rows_in:,} -> {result.rows_out:,} rows "
                f"({result.dropped:,} dropped{': ' + why if why else ''}) -> {result.output}"
            )
    except datautil.DatautilError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (
        duckdb.IOException, duckdb.InvalidInputException, duckdb.ConversionException, duckdb.BinderException,
    ) as error:  # fmt: skip
        # A file DuckDB cannot parse (malformed CSV, corrupt Parquet, mixed-up types): the input's fault.
        print(f"error reading input: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
