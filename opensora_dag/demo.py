"""``make demo``: seed a sample batch and run the whole graph on the embedded default."""

from __future__ import annotations

import time

from resources.lakehouse import Lakehouse

DEMO_BATCH = "sample"


def run_demo(lake: Lakehouse) -> int:
    from curation.samples import seed_sample_batch

    from opensora_dag.instance import get_instance, materialize_selection

    started = time.monotonic()
    lake.ensure_layout()
    batch_dir = lake.batch_dir(DEMO_BATCH)
    if not batch_dir.is_dir() or not any(batch_dir.iterdir()):
        files = seed_sample_batch(batch_dir)
        print(f"seeded {len(files)} files into {batch_dir}")
    instance = get_instance(lake.root)
    outcomes = materialize_selection("*", [DEMO_BATCH], instance)
    ok = all(o.success for o in outcomes)
    for o in outcomes:
        where = f"batch {o.partition_key}" if o.partition_key else "unpartitioned"
        print(f"{'ok    ' if o.success else 'FAILED'} {where}: {', '.join(o.asset_keys)}")

    print(f"\nDemo finished in {time.monotonic() - started:.0f} s. Where to look:")
    print(f"  data root        {lake.root}")
    print(f"  catalog (DuckDB) {lake.catalog_path}   e.g. opensora-dag sql 'SELECT * FROM raw_videos'")
    for view in lake.query("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1")["view_name"]:
        print(f"    view {view}")
    print(f"  media            {lake.media_dir}")
    print(f"  MLflow store     {lake.mlruns_dir}")
    print("  Dagster UI       make ui   (http://127.0.0.1:3000)")
    return 0 if ok else 1
