"""Partitions: one ``video_batches`` partition per landing folder (an ingestion batch, not a video)."""

from dagster import DynamicPartitionsDefinition, asset

video_batches = DynamicPartitionsDefinition(name="video_batches")


def batch_asset(*, code_version: str = "1", **kwargs):
    """``@asset`` for a curation step: one partition per batch, in the curation group; other arguments as ``asset``."""
    return asset(partitions_def=video_batches, group_name="curation", code_version=code_version, **kwargs)
