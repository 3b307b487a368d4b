"""Dagster resources: one ConfigurableResource per outside system."""
