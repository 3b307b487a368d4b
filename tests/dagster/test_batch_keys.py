"""Keys are never paths: batch keys are validated where they enter (CLI, sensor, UI-added partitions)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import DagsterEventType, build_sensor_context, instance_for_test

from opensora_dag import cli
from opensora_dag.instance import materialize_selection
from opensora_dag.sensors import landing_zone_sensor
from resources.batch_keys import (
    LANDING_TABLE,
    InvalidBatchKey,
    key_for_folder,
    landing_folder,
    read_landing_map,
    register_landing_folder,
    validate_batch_key,
)
from resources.lakehouse import Lakehouse
from tests.dagster.conftest import fill_batch

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "opensora_dag.cli"]


def _settled_tick(lake, instance):
    """Two sensor evaluations from a fresh cursor: a folder is settled when its file list and sizes are what the
    previous tick saw. Returns the second tick's result."""
    context = build_sensor_context(instance=instance, resources={"lakehouse": lake})
    first = landing_zone_sensor(context)
    assert not getattr(first, "run_requests", None), "nothing is settled on the first look"
    return landing_zone_sensor(build_sensor_context(instance=instance, cursor=context.cursor, resources={"lakehouse": lake}))


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


# ---- validation ------------------------------------------------------------------------------------------------
GOOD_KEYS = ["june", "cam_1", "ok-name_1.v2", "a.b.c", "2024-06-01", "-dash", "x" * 120, "A"]
BAD_KEYS = [
    ("", "empty"),
    ("..", "start with '.'"),
    ("../x", "only letters"),
    ("a..b", "'..'"),
    (".hidden", "start with '.'"),
    ("/some/folder", "only letters"),
    ("a/b", "only letters"),
    ("a\\b", "only letters"),
    ("a b", "only letters"),
    ("été", "only letters"),
    ("a,b", "only letters"),
    ("tab\there", "only letters"),
    ("x" * 121, "at most 120"),
]


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_valid_keys_pass_unchanged(key):
    assert validate_batch_key(key) == key


@pytest.mark.parametrize("key,rule", BAD_KEYS)
def test_invalid_keys_are_refused_naming_the_rule_and_the_key(key, rule):
    with pytest.raises(InvalidBatchKey) as err:
        validate_batch_key(key)
    assert isinstance(err.value, ValueError)
    assert rule in str(err.value) and repr(key) in str(err.value)


# ---- folder -> key ---------------------------------------------------------------------------------------------
def test_key_for_folder_is_stable_unique_and_ascii():
    ete = key_for_folder("Été 2024 clips", {})
    assert validate_batch_key(ete) == ete and ete.startswith("Ete_2024_clips-") and len(ete) == len("Ete_2024_clips-") + 8
    assert key_for_folder("Été 2024 clips", {"other": "other"}) == ete  # stable, whatever else exists
    assert key_for_folder("Été 2024 clips", {ete: "Été 2024 clips"}) == ete  # a registered folder keeps its key
    # accents and spaces fold to the same slug, the hash of the exact name keeps the keys apart
    names = ["été 2024", "ete 2024", "ete_2024", "Ete 2024", "a b", "a_b", "a  b", "日本語", "映像", "...", ".hidden", "a..b"]
    keys = [key_for_folder(n, {}) for n in names]
    assert len(set(keys)) == len(names)
    assert all(validate_batch_key(k) == k for k in keys)
    assert key_for_folder("ete_2024", {}) == "ete_2024"  # a valid free name is its own key
    assert key_for_folder("a..b", {}).startswith("a.b-") and key_for_folder(".hidden", {}).startswith("hidden-")
    long = key_for_folder("ü" * 300, {})
    assert len(long) == 120 and validate_batch_key(long) == long
    assert key_for_folder("ü" * 300, {}) != key_for_folder("ü" * 299, {})


def test_key_for_folder_never_gives_two_folders_one_key():
    taken = {"june": "June drop"}  # e.g. `ingest --batch june` of a folder named otherwise
    other = key_for_folder("june", taken)
    assert other != "june" and other.startswith("june-")
    with pytest.raises(InvalidBatchKey, match="already belongs to folder"):
        key_for_folder("a b", {key_for_folder("a b", {}): "someone else"})


@pytest.mark.parametrize("name", ["", "   ", ".", "..", "a/b", "bad\udcff"])
def test_unmappable_folder_names_are_refused(name):
    with pytest.raises(InvalidBatchKey, match="cannot map landing folder"):
        key_for_folder(name, {})


def test_landing_map_round_trip_and_landing_folder(home):
    lake = Lakehouse(home=str(home))
    folder = fill_batch(lake.landing_dir, "Été 2024 clips", [])
    key = register_landing_folder(lake, "Été 2024 clips")
    assert register_landing_folder(lake, "Été 2024 clips") == key  # idempotent
    assert read_landing_map(lake) == {key: "Été 2024 clips"}
    assert set(lake.read_table(LANDING_TABLE).columns) >= {"key", "folder", "registered_at"}
    assert landing_folder(lake, key) == folder.resolve()

    fill_batch(lake.landing_dir, "plain", [])  # unregistered, valid name: falls back to landing/<key>
    assert landing_folder(lake, "plain") == (lake.landing_dir / "plain").resolve()
    with pytest.raises(FileNotFoundError):
        landing_folder(lake, "missing")
    for bad in ("../plain", ".hidden", "a..b"):
        with pytest.raises(InvalidBatchKey):
            landing_folder(lake, bad)

    outside = home / "elsewhere"
    outside.mkdir()
    (lake.landing_dir / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidBatchKey, match="not a folder directly inside"):
        landing_folder(lake, "linked")


# ---- the command line ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["../x", "/some/folder", ".hidden", "x" * 121, "a..b", ".."])
def test_cli_materialize_refuses_bad_keys_before_anything(home, key, capsys):
    rc = cli.main(["--home", str(home), "materialize", "--select", "raw_videos", "--batch", key])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: invalid batch key") and repr(key) in err
    assert not home.exists(), "nothing may be written for a refused key"


@pytest.mark.parametrize("key", ["../x", "/some/folder", ".hidden", "x" * 121])
def test_cli_ingest_refuses_bad_keys_before_anything(home, key, tmp_path, tiny_videos, capsys):
    source = fill_batch(tmp_path, "drop", tiny_videos[:1])
    rc = cli.main(["--home", str(home), "ingest", str(source), "--batch", key])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: invalid batch key") and len(err.splitlines()) == 1
    assert not home.exists()
    assert _files(source) == {source / tiny_videos[0].name}


def test_cli_materialize_with_a_folder_as_batch_deletes_nothing(home, tmp_path, tiny_videos):
    """The issue's reproduction: `--batch /some/folder` used to cut clips into it and delete its videos."""
    victim = fill_batch(tmp_path, "victim", tiny_videos[:1])
    before = {p: p.read_bytes() for p in _files(victim)}
    env = {**os.environ, "OPENSORA_HOME": str(home)}
    for key in (str(victim), "../" + victim.name):
        out = subprocess.run(CLI + ["materialize", "--batch", key, "--select", "key:raw_videos or key:scenes or key:clips"],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "invalid batch key" in out.stderr and "ok" not in out.stdout
    assert {p: p.read_bytes() for p in _files(victim)} == before
    assert not _files(home)


def test_cli_ingest_maps_a_folder_name_like_the_sensor(home, tmp_path, tiny_videos, capsys):
    source = fill_batch(tmp_path, "Été drop", tiny_videos[:1])
    assert cli.main(["--home", str(home), "ingest", str(source)]) == 0
    lake = Lakehouse(home=str(home))
    key = key_for_folder("Été drop", {})
    assert read_landing_map(lake) == {key: "Été drop"}
    assert (lake.landing_dir / "Été drop" / tiny_videos[0].name).is_file()
    assert landing_folder(lake, key) == (lake.landing_dir / "Été drop").resolve()
    from dagster import DagsterInstance

    assert key in DagsterInstance.get().get_dynamic_partitions("video_batches")
    assert cli.main(["--home", str(home), "ingest", str(source)]) == 0  # again: same key, nothing new
    assert read_landing_map(lake) == {key: "Été drop"}
    # the sensor sees the same folder under the same key
    with instance_for_test() as instance:
        result = _settled_tick(lake, instance)
        assert [r.partition_key for r in result.run_requests] == [key]
    capsys.readouterr()


# ---- the UI path: a bad partition added straight to the instance -----------------------------------------------
def _failure_text(instance, run_id: str) -> str:
    texts = []
    for record in instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE):
        error = record.dagster_event.step_failure_data.error
        texts.append(error.to_string())
    return "\n".join(texts)


@pytest.mark.parametrize("key,folder", [("../outside", "outside"), ("a..b", "landing/a..b"), (".hidden", "landing/.hidden")])
def test_ui_added_bad_partition_fails_the_run_before_any_io(home, tiny_videos, key, folder):
    """Dagster accepts these keys; the asset must refuse them although a folder with a video sits where they point."""
    lake = Lakehouse(home=str(home))
    lake.ensure_layout()
    target = fill_batch(home, folder, tiny_videos[:1])
    before = _files(home)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("video_batches", [key])  # what the UI's "Add a partition" does
        [outcome] = materialize_selection("raw_videos", [key], instance)
        assert not outcome.success
        message = _failure_text(instance, outcome.run_id)
        assert "InvalidBatchKey" in message and f"invalid batch key {key!r}" in message
    assert _files(home) == before, "nothing written"
    assert _files(target) == {target / tiny_videos[0].name}
    assert not list(lake.lake_dir.rglob("*.parquet"))


# ---- the landing sensor ----------------------------------------------------------------------------------------
def test_sensor_maps_non_ascii_folder_to_a_stable_key(home, tiny_videos):
    lake = Lakehouse(home=str(home))
    fill_batch(lake.landing_dir, "Été 2024 clips", tiny_videos[:1])
    fill_batch(lake.landing_dir, "a b", tiny_videos[1:2])
    fill_batch(lake.landing_dir, "a_b", tiny_videos[2:3])  # sanitises to what "a b" would: must not share its key
    with instance_for_test() as instance:
        result = _settled_tick(lake, instance)
        keys = [r.partition_key for r in result.run_requests]
        ete = key_for_folder("Été 2024 clips", {})
        assert ete.startswith("Ete_2024_clips-")
        assert sorted(keys) == sorted([ete, "a_b", key_for_folder("a b", {})]) and len(set(keys)) == 3
        assert all(validate_batch_key(k) == k for k in keys)
        assert read_landing_map(lake) == {ete: "Été 2024 clips", "a_b": "a_b", key_for_folder("a b", {}): "a b"}

        again = landing_zone_sensor(build_sensor_context(instance=instance, cursor=result.cursor, resources={"lakehouse": lake}))
        assert not getattr(again, "run_requests", None)
        fresh = _settled_tick(lake, instance)
        assert sorted(r.partition_key for r in fresh.run_requests) == sorted(keys)  # same keys on every evaluation

        # the asset finds the folder through the mapping
        [outcome] = materialize_selection("raw_videos", [ete], instance)
        assert outcome.success
        paths = lake.read_partition("raw_videos", ete)["path"].to_list()
        assert [Path(p).parent for p in paths] == [(lake.landing_dir / "Été 2024 clips").resolve()]


def test_sensor_reports_an_unmappable_folder_and_keeps_going(home, tiny_videos):
    lake = Lakehouse(home=str(home))
    lake.landing_dir.mkdir(parents=True)
    bad = Path(os.fsdecode(os.fsencode(str(lake.landing_dir)) + b"/bad\xff"))
    try:
        bad.mkdir()
    except OSError:
        pytest.skip("this filesystem refuses non-UTF-8 folder names")
    shutil.copy(tiny_videos[0], bad / tiny_videos[0].name)
    fill_batch(lake.landing_dir, "good", tiny_videos[1:2])
    with instance_for_test() as instance:
        result = _settled_tick(lake, instance)
        assert [r.partition_key for r in result.run_requests] == ["good"]
        assert read_landing_map(lake) == {"good": "good"}
        again = landing_zone_sensor(build_sensor_context(instance=instance, cursor=result.cursor, resources={"lakehouse": lake}))
        assert "bad" in again.skip_message and "cannot map landing folder" in again.skip_message
