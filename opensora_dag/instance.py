"""The project's Dagster instance and in-process materialization, shared by the CLI and the demo."""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def ensure_dagster_home(opensora_home: Path) -> Path:
    """Point DAGSTER_HOME at ``$OPENSORA_HOME/dagster`` holding the project's dagster.yaml (unless already set)."""
    if os.environ.get("DAGSTER_HOME"):
        home = Path(os.environ["DAGSTER_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        return home
    home = Path(opensora_home).resolve() / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    source = REPO_ROOT / "dagster.yaml"
    if source.is_file():
        shutil.copyfile(source, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


_INSTANCES: dict[Path, Any] = {}


def get_instance(opensora_home: Path):
    """The Dagster instance of ``opensora_home``; one per home and process (creating one costs ~0.7 s: ``curate``
    registers the batch and then materializes it with the same instance)."""
    from dagster import DagsterInstance

    home = ensure_dagster_home(opensora_home)
    if home not in _INSTANCES:
        _INSTANCES[home] = DagsterInstance.get()
    return _INSTANCES[home]


@dataclass
class MaterializeOutcome:
    partition_key: str | None
    asset_keys: list[str]
    success: bool
    run_id: str


def materialize_selection(
    selection: str | None, batches: list[str] | None, instance, defs=None, resources: dict | None = None,
    asset_config: dict[str, dict] | None = None,
) -> list[MaterializeOutcome]:
    """Run the selected assets in-process: partitioned ones once per batch, then unpartitioned ones whole.

    ``selection`` uses Dagster's selection syntax (``group:curation``, ``raw_videos+``, ``key:clips``);
    ``batches`` default to every registered ``video_batches`` partition; ``resources`` override the code location's;
    ``asset_config`` maps an asset name to its run config (``{"curated_dataset": {"preset": "demo"}}``), given to
    the run that materializes it.
    """
    from dagster import AssetSelection, materialize

    if defs is None:
        from opensora_dag.definitions import defs
    from assets.partitions import video_batches

    graph = defs.resolve_asset_graph()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys = AssetSelection.from_string(selection or "*").resolve(graph)
    if not keys:
        raise ValueError(f"selection {selection!r} matches no asset")
    partitioned = sorted((k for k in keys if graph.get(k).is_partitioned), key=lambda k: k.to_user_string())
    unpartitioned = sorted((k for k in keys if not graph.get(k).is_partitioned), key=lambda k: k.to_user_string())

    if partitioned:
        registered = set(instance.get_dynamic_partitions(video_batches.name))
        if batches is None:
            batches = sorted(registered)
            if not batches:
                raise ValueError("no video_batches partition is registered: run `opensora-dag ingest PATH` first")
        missing = [b for b in batches if b not in registered]
        if missing:
            instance.add_dynamic_partitions(video_batches.name, missing)

    all_assets = list(defs.assets or []) + list(defs.asset_checks or [])
    resources = {**(defs.resources or {}), **(resources or {})}
    outcomes: list[MaterializeOutcome] = []

    def run_config(keys) -> dict | None:
        ops = {k.path[-1]: {"config": cfg} for k in keys for name, cfg in (asset_config or {}).items() if k.to_user_string() == name}
        return {"ops": ops} if ops else None

    for batch in (batches or []) if partitioned else []:
        result = materialize(all_assets, selection=partitioned, partition_key=batch, instance=instance, resources=resources,
                             run_config=run_config(partitioned), raise_on_error=False)
        outcomes.append(MaterializeOutcome(batch, [k.to_user_string() for k in partitioned], result.success, result.run_id))
    if unpartitioned:
        result = materialize(all_assets, selection=unpartitioned, instance=instance, resources=resources,
                             run_config=run_config(unpartitioned), raise_on_error=False)
        outcomes.append(MaterializeOutcome(None, [k.to_user_string() for k in unpartitioned], result.success, result.run_id))
    return outcomes
