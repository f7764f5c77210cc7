"""Entry point: ``python -m services.metrics`` or ``webshard-metrics``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.common.server import main as service_main
from services.metrics.server import make_app
from services.metrics.settings import DEFAULT_PORT, MetricsSettings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the metrics service until SIGTERM."""
    return service_main(
        name="metrics",
        settings_type=MetricsSettings,
        default_port=DEFAULT_PORT,
        make_app=make_app,
        description="webshard metrics: DuckDB events, queries, reports, dashboard.",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
