"""Settings come from WEBSHARD_* variables, flags override them, bad values stop the process."""

from __future__ import annotations

import pytest

from services.browser_agent import settings as agent_settings
from services.browser_agent.settings import AgentSettings
from services.common.settings import ServerSettings, SettingsError, load_settings
from services.coordinator.settings import CoordinatorSettings


def test_defaults_without_env_or_flags() -> None:
    settings = load_settings(ServerSettings, [], env={})
    assert settings.host == "127.0.0.1"
    assert settings.port == 0
    assert settings.drain_grace_s == 5.0


def test_env_sets_and_flags_override() -> None:
    env = {"WEBSHARD_PORT": "6000", "WEBSHARD_LOG_LEVEL": "DEBUG", "WEBSHARD_HOST": "0.0.0.0"}
    settings = load_settings(ServerSettings, ["--port", "7000"], env=env)
    assert settings.port == 7000
    assert settings.log_level == "DEBUG"
    assert settings.host == "0.0.0.0"


def test_lists_are_comma_separated() -> None:
    settings = load_settings(AgentSettings, [], env={"WEBSHARD_COORDINATORS": "a:1, b:2,,c:3"})
    assert settings.coordinators == ["a:1", "b:2", "c:3"]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"WEBSHARD_PORT": "eighty"}, "WEBSHARD_PORT='eighty' is not a valid int"),
        (["--port", "70000"], {}, "outside 0..65535"),
        (["--drain-grace-s", "-1"], {}, "negative"),
        (["--log-level", "LOUD"], {}, "LOUD"),
    ],
)
def test_bad_values_name_the_setting(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(ServerSettings, argv, env=env)


def test_coordinator_peers_must_be_id_equals_address() -> None:
    good = load_settings(
        CoordinatorSettings,
        ["--replica-id", "c0", "--peers", "c1=127.0.0.1:1,c2=127.0.0.1:2"],
        env={},
    )
    assert good.peer_addresses() == {"c1": "127.0.0.1:1", "c2": "127.0.0.1:2"}
    with pytest.raises(SettingsError, match="not id=host:port"):
        load_settings(CoordinatorSettings, ["--peers", "127.0.0.1:1"], env={})
    with pytest.raises(SettingsError, match="own id"):
        load_settings(CoordinatorSettings, ["--replica-id", "c0", "--peers", "c0=h:1"], env={})


def test_heartbeat_timeout_must_exceed_interval() -> None:
    with pytest.raises(SettingsError, match="heartbeat"):
        load_settings(
            CoordinatorSettings,
            ["--heartbeat-interval-s", "2", "--heartbeat-timeout-s", "1"],
            env={},
        )


def test_a_statefulset_pod_derives_its_peers_from_its_name() -> None:
    settings = load_settings(
        CoordinatorSettings,
        [],
        env={
            "WEBSHARD_POD_NAME": "coordinator-2",
            "WEBSHARD_POD_NAMESPACE": "webshard",
            "WEBSHARD_PEER_SERVICE": "coordinator-headless",
            "WEBSHARD_REPLICAS": "3",
        },
    )
    assert settings.replica_id == "coordinator-2"
    assert settings.peer_addresses() == {
        "coordinator-0": "coordinator-0.coordinator-headless.webshard.svc.cluster.local:50051",
        "coordinator-1": "coordinator-1.coordinator-headless.webshard.svc.cluster.local:50051",
    }


def test_an_agent_engine_must_be_known_and_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        SettingsError, match="unknown browser engine 'safari'; engines: chromium, firefox"
    ):
        load_settings(AgentSettings, ["--engine", "safari"], env={})
    monkeypatch.setattr(agent_settings, "missing_binaries", lambda options: [options.firefox])
    with pytest.raises(
        SettingsError, match="needs /usr/bin/firefox-esr: install Debian's firefox-esr"
    ):
        load_settings(AgentSettings, ["--engine", "firefox"], env={})
    # An agent that runs no browser needs none installed.
    settings = load_settings(AgentSettings, ["--engine", "firefox", "--browsers", "0"], env={})
    assert settings.engine == "firefox"
