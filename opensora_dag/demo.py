"""``make demo``: seed a sample batch and run the whole graph on the embedded default."""

from __future__ import annotations

import time

from resources.lakehouse import Lakehouse

DEMO_BATCH = "sample"
DEMO_PROMPT_SET = "world_v1"


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
    # No CLIP / aesthetic weights ship with the demo: its dataset spec skips the aes and match criteria on purpose
    # (the `demo` filter preset), which shows as two failed, non-blocking checks on curated_dataset.
    # The evaluation asks for the synthetic world the demo model learns (prompt set world_v1), so that its weight-free
    # prompt adherence, beside the step-0 and shuffled-prompt controls, says what the model learned.
    asset_config = {"curated_dataset": {"preset": "demo"},
                    "model_evaluation": {"prompt_set": DEMO_PROMPT_SET, "embed_previews": 10}}
    outcomes = materialize_selection("*", [DEMO_BATCH], instance, asset_config=asset_config)
    ok = all(o.success for o in outcomes)
    for o in outcomes:
        where = f"batch {o.partition_key}" if o.partition_key else "unpartitioned"
        print(f"{'ok    ' if o.success else 'FAILED'} {where}: {', '.join(o.asset_keys)}")

    print(f"\nDemo finished in {time.monotonic() - started:.0f} s. Where to look:")
    loc = lake.location
    print(f"  local home       {lake.root}")
    print(f"  lake catalog     {loc.catalog.split(' password')[0]}   (DuckLake; data under {loc.lake_data})")
    print("    e.g. opensora-dag sql 'SELECT * FROM raw_videos'   ·   opensora-dag lake snapshots")
    print(f"    tables: {', '.join(lake.tables())}")
    print(f"    views:  {', '.join(lake.refresh_catalog())}")
    print(f"  media            {lake.media_dir}")
    print(f"  MLflow store     {lake.mlruns_dir}")
    print("  Dagster UI       make ui   (http://127.0.0.1:3000)")
    return 0 if ok else 1
