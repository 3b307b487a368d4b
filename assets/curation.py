"""Curation assets: thin wrappers that read a batch from the lakehouse, call the library, write the result."""


from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from opensora_dag.partitions import video_batches
from resources.lakehouse import Lakehouse


def markdown_table(frame, max_rows: int = 20) -> MetadataValue:
    """A small preview of a table for the Dagster UI."""
    if frame.is_empty():
        return MetadataValue.md("_(no rows)_")
    head = frame.head(max_rows)
    cols = head.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in head.iter_rows():
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return MetadataValue.md("\n".join(lines))


@asset(
    partitions_def=video_batches,
    group_name="curation",
    code_version="1",
    kinds={"pyav", "parquet"},
    description="One row per distinct video file of a landing batch (probed with PyAV); bad files go to `quarantine`.",
)
def raw_videos(context: AssetExecutionContext, lakehouse: Lakehouse) -> MaterializeResult:
    from curation.ingest import scan_batch

    batch = context.partition_key
    scan = scan_batch(lakehouse.batch_dir(batch), progress=context.log.info)
    lakehouse.write_partition("raw_videos", batch, scan.videos)
    lakehouse.write_partition("quarantine", batch, scan.quarantine, part="raw_videos")
    lakehouse.refresh_catalog()
    for row in scan.quarantine.iter_rows(named=True):
        context.log.warning(f"quarantined {row['path']}: {row['reason']}")
    return MaterializeResult(
        metadata={
            "num_videos": len(scan.videos),
            "num_quarantined": len(scan.quarantine),
            "total_duration_s": float(scan.videos["duration"].sum() or 0.0),
            "sidecars": len(scan.sidecars),
            "preview": markdown_table(scan.videos.select("path", "codec", "fps", "num_frames", "height", "width", "duration")),
            "quarantine": markdown_table(scan.quarantine.select("path", "reason")),
        }
    )


# The per-batch curation assets, in pipeline order (the curation job runs them for one partition).
BATCH_ASSETS = [raw_videos]
