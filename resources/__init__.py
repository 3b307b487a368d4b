"""Dagster resources: one ConfigurableResource per outside system."""

from resources.lakehouse import Lakehouse, sanitize_partition_key

__all__ = ["Lakehouse", "sanitize_partition_key"]
