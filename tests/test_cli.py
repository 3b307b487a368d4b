"""One ``opensora-dag`` command tree: every entry point is a subcommand, built without torch, ``--home`` set for all."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "opensora_dag.cli"]
SUBCOMMANDS = ("ingest", "materialize", "sql", "lake", "demo", "data", "conformance", "buckets", "train",
               "encoder-cache", "sample", "app")


def test_help_lists_every_subcommand():
    out = subprocess.run(CLI + ["--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    listed = out.stdout.split("positional arguments:")[1]
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in listed, name


def test_encoder_cache_help():
    out = subprocess.run(CLI + ["encoder-cache", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: opensora-dag encoder-cache")
    for flag in ("--dataset", "--out", "--set", "--nproc", "--posterior"):
        assert flag in out.stdout


def test_building_the_tree_imports_no_torch():
    code = "import sys; from opensora_dag.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_a_command_line_builds_only_its_own_library_command():
    code = ("import sys; from opensora_dag.cli import build_parser, named_command; "
            "args = build_parser(named_command(['--home', 'h', 'ingest', 'x'])).parse_args(['--home', 'h', 'ingest', 'x']); "
            "print(args.command, 'training.arguments' in sys.modules, 'models.conformance' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["ingest", "False", "False"]
    assert subprocess.run(CLI + ["--help"], capture_output=True, text=True, cwd=REPO).stdout.count("encoder-cache") >= 1


def test_data_ops_and_export_share_one_subcommand():
    from opensora_dag.cli import build_parser, cmd_data_export

    args = build_parser().parse_args(["data", "export", "latest", "out", "--workers", "2"])
    assert args.func is cmd_data_export and (args.version, args.workers) == ("latest", 2)
    args = build_parser().parse_args(["data", "filter", "in.csv", "out.csv", "--fmin", "10"])
    assert (args.op, args.output_path, args.fmin) == ("filter", "out.csv", 10.0)


def test_home_is_set_before_a_library_command_runs(tmp_path, monkeypatch, capsys):
    from opensora_dag.cli import main

    monkeypatch.setenv("OPENSORA_HOME", str(tmp_path / "elsewhere"))
    assert main(["--home", str(tmp_path / "home"), "buckets", str(tmp_path / "missing.parquet")]) == 2
    assert os.environ["OPENSORA_HOME"] == str(tmp_path / "home")


@pytest.mark.parametrize("argv", [
    ["demo-cpu", "--dataset", "d.parquet", "--nproc", "2"],
    ["stage1", "--nproc=4", "--dataset", "v1", "--steps", "5", "--ckpt-every", "2", "--outdir", "-odd dir",
     "--resume", "--objective", "rflow", "--tracking-uri", "file:/x", "--set", "optim.lr=1e-4", "--set", "seed=-1"],
    ["stage2", "--dataset", "v1", "--resume", "run-003", "--config-json", '{"name": "x"}', "--nproc", "8"],
])
def test_train_workers_get_the_same_arguments_without_nproc(argv):
    from training.arguments import add_train_arguments, train_worker_argv

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    worker = parser.parse_args(train_worker_argv(args))
    assert "--nproc" not in " ".join(train_worker_argv(args))
    assert vars(worker) == {**vars(args), "nproc": None}


def test_train_nproc_starts_torchrun_on_the_module(monkeypatch):
    """`opensora-dag train ... --nproc N` re-runs itself as N torchrun workers of `-m training.train`, minus --nproc."""
    import training.train

    from opensora_dag.cli import main

    calls = []
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(training.train.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["train", "demo-cpu", "--dataset", "d.parquet", "--nproc", "2", "--set", "seed=3"]) == 0
    (cmd,) = calls
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    module = cmd.index("-m", cmd.index("torch.distributed.run"))
    assert cmd[module + 1 : module + 2] == ["training.train"]
    assert cmd[module + 2 :] == ["demo-cpu", "--dataset=d.parquet", "--set=seed=3"]
