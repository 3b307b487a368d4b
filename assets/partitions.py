"""Partitions: one ``video_batches`` partition per landing folder (an ingestion batch, not a video)."""

from dagster import DynamicPartitionsDefinition

video_batches = DynamicPartitionsDefinition(name="video_batches")
