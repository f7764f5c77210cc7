"""Entry point: ``python -m services.browser_agent`` or ``webshard-browser-agent``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.browser_agent.server import make_app
from services.browser_agent.settings import DEFAULT_PORT, AgentSettings
from services.common.server import main as service_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run one browser agent until SIGTERM."""
    return service_main(
        name="browser-agent",
        settings_type=AgentSettings,
        default_port=DEFAULT_PORT,
        make_app=make_app,
        description="webshard browser agent: headless browsers hosting model shards.",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
