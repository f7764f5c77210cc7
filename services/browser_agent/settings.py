"""Browser-agent settings."""

from __future__ import annotations

import dataclasses

from services.browser_agent.browser.engines import missing_binaries
from services.browser_agent.browser.options import BrowserOptions
from services.common.engines import ENGINES, unknown_engine
from services.common.settings import ServerSettings, SettingsError, setting

DEFAULT_PORT = 50052


@dataclasses.dataclass
class AgentSettings(ServerSettings):
    """Settings of one browser agent."""

    agent_id: str = setting("agent-0", "This agent's id, unique in the cluster.")
    advertise_address: str = setting(
        "", "Address the coordinator should use to reach this agent; empty uses host:port."
    )
    coordinators: list[str] = setting(
        ["127.0.0.1:50051"],
        "Coordinator replica addresses, comma-separated; the agent follows the leader.",
    )
    memory_budget_mb: int = setting(4096, "Memory the agent may give to shards, in MiB.")
    reconnect_max_backoff_s: float = setting(
        2.0, "Longest wait between attempts to reopen the coordinator session."
    )
    recovery: str = setting(
        "", "The recovery service's address; browser crashes and lost devices are reported there."
    )
    browsers: int = setting(1, "Headless browsers hosting shards; 0 runs none.")
    engine: str = setting("chromium", f"The browsers' engine: {' or '.join(ENGINES)}.")
    standby_browsers: int = setting(
        0, "Pre-launched browsers with the runtime loaded, ready to take over a failed one."
    )
    native: bool = setting(True, "Also offer the native runtime (Python onnxruntime on the CPU).")
    native_threads: int = setting(1, "onnxruntime intra-op threads per native shard session.")
    max_shard_mb: int = setting(2048, "Largest shard the agent accepts, in MiB.")
    browser_memory_headroom_mb: int = setting(
        384,
        "A browser holding shards whose process tree grows this many MiB past its size "
        "after its last load is reported out of memory, so recovery moves its shards.",
    )
    memory_check_ms: float = setting(250.0, "How often the browsers' memory is sampled.")
    fault_token: str = setting(
        "",
        "When set, ApplyFaultHook and RevertFaultHook calls must carry "
        "'authorization: Bearer <token>' metadata: the fault-injector's token.",
    )

    def validate(self) -> None:
        """Check the agent's identity and coordinators."""
        super().validate()
        if not self.agent_id:
            raise SettingsError("agent id must not be empty")
        if not self.coordinators:
            raise SettingsError("at least one coordinator address is needed")
        if self.memory_budget_mb <= 0:
            raise SettingsError("memory budget must be positive")
        if self.browsers < 0 or self.standby_browsers < 0:
            raise SettingsError("browser counts must not be negative")
        if self.browsers == 0 and not self.native:
            raise SettingsError("an agent needs browsers or the native runtime (or both)")
        if self.engine not in ENGINES:
            raise SettingsError(unknown_engine(self.engine))
        missing = missing_binaries(BrowserOptions(engine=self.engine))
        if (self.browsers or self.standby_browsers) and missing:
            package = {"chromium": "chromium chromium-driver", "firefox": "firefox-esr"}
            raise SettingsError(
                f"the {self.engine} engine needs {', '.join(missing)}: install Debian's "
                f"{package[self.engine]} (make setup does), or run no browsers (--browsers 0)"
            )
        if self.browser_memory_headroom_mb < 1 or self.memory_check_ms <= 0:
            raise SettingsError("the memory headroom and check interval must be positive")
        if self.native_threads < 1 or self.max_shard_mb < 1:
            raise SettingsError("native threads and the shard size limit must be positive")
