"""Entry point: ``python -m services.recovery`` or ``webshard-recovery``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.common.server import main as service_main
from services.recovery.server import make_app
from services.recovery.settings import DEFAULT_PORT, RecoverySettings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the recovery service until SIGTERM."""
    return service_main(
        name="recovery",
        settings_type=RecoverySettings,
        default_port=DEFAULT_PORT,
        make_app=make_app,
        description="webshard recovery: strategies, circuit breakers, escalation.",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
