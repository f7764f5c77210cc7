"""Entry point: ``python -m services.coordinator`` or ``webshard-coordinator``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.common.server import main as service_main
from services.coordinator.server import make_app
from services.coordinator.settings import DEFAULT_PORT, CoordinatorSettings


def main(argv: Sequence[str] | None = None) -> int:
    """Run one coordinator replica until SIGTERM."""
    return service_main(
        name="coordinator",
        settings_type=CoordinatorSettings,
        default_port=DEFAULT_PORT,
        make_app=make_app,
        description="webshard coordinator replica: agent registry, placement, routing.",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
