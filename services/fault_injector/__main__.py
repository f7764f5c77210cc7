"""Entry point: ``python -m services.fault_injector`` or ``webshard-fault-injector``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.common.server import main as service_main
from services.fault_injector.server import make_app
from services.fault_injector.settings import DEFAULT_PORT, FaultInjectorSettings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fault-injector service until SIGTERM."""
    return service_main(
        name="fault-injector",
        settings_type=FaultInjectorSettings,
        default_port=DEFAULT_PORT,
        make_app=make_app,
        description="webshard fault-injector: fault specs, schedules, auto-revert, guardrails.",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
