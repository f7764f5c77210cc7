"""Every label a campaign writes comes from the cluster's actual settings, and the
local cluster points the services that record as they go at its metrics service."""

from __future__ import annotations

from pathlib import Path

import pytest
from webshard.cli.local import LocalCluster
from webshard.recovery.v1 import recovery_pb2

from services.campaign.runner import Addresses, Iteration, _recovery_record, breakers_setting


@pytest.mark.parametrize("breakers", [True, False])
def test_recovery_records_carry_the_clusters_breaker_setting(
    tmp_path: Path, breakers: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WEBSHARD_BREAKERS_ENABLED", raising=False)
    cluster = LocalCluster(
        agents=1,
        data_dir=tmp_path,
        auto_ports=True,
        extra_args={"recovery": ["--breakers-enabled", "true" if breakers else "false"]},
    )
    addresses = Addresses.of(cluster)
    assert addresses.breakers_enabled is breakers
    record = _recovery_record(
        recovery_pb2.Recovery(recovery_id="rec-1"),
        Iteration("browser_crash", "progressive", 0.0),
        "minilm-l6",
        "wasm",
        "run-1",
        breakers_enabled=addresses.breakers_enabled,
    )
    assert record.breakers_enabled is breakers


def test_the_breaker_setting_follows_the_services_own_precedence() -> None:
    assert breakers_setting([], {}) is True  # the recovery service's default
    assert breakers_setting([], {"WEBSHARD_BREAKERS_ENABLED": "off"}) is False
    flags = ["--breakers-enabled", "false", "--breakers-enabled", "yes"]
    assert breakers_setting(flags, {"WEBSHARD_BREAKERS_ENABLED": "0"}) is True
    assert breakers_setting(["--breakers-enabled=0"], {}) is False
    with pytest.raises(ValueError, match="not a boolean"):
        breakers_setting(["--breakers-enabled", "maybe"], {})


def test_recovery_and_the_fault_injector_send_to_the_clusters_metrics(tmp_path: Path) -> None:
    cluster = LocalCluster(agents=1, data_dir=tmp_path, auto_ports=True)
    metrics = cluster.address("metrics")
    for name in ("recovery", "fault-injector"):
        proc = next(p for p in cluster.processes if p.name == name)
        assert proc.args[proc.args.index("--metrics") + 1] == metrics
