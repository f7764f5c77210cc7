"""Metrics: the only owner of the DuckDB file; events, queries, reports and the dashboard."""
