"""The local cluster's plan: which ports its processes get."""

from __future__ import annotations

from pathlib import Path

import pytest
from webshard.cli import local
from webshard.cli.local import plan


def test_auto_ports_stay_below_the_ephemeral_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port in the ephemeral range could be handed to an outgoing connection (the
    coordinators dialling each other) before its service binds it."""
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    monkeypatch.setattr(local, "EPHEMERAL_RANGE_FILE", ranges)
    ports = [
        int(p.address.rpartition(":")[2])
        for p in plan(agents=3, data_dir=tmp_path, auto_ports=True)
    ]
    assert len(ports) == len(set(ports)) == 9  # 3 coordinators, 3 agents and 3 services
    assert all(10_000 <= port < 32768 for port in ports), ports


def test_without_room_below_it_the_kernel_picks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("1024\t65535\n")
    monkeypatch.setattr(local, "EPHEMERAL_RANGE_FILE", ranges)
    processes = plan(agents=1, data_dir=tmp_path, auto_ports=True)
    assert all(int(p.address.rpartition(":")[2]) >= 1024 for p in processes)


def test_agents_take_the_engines_in_turn_and_an_unknown_one_is_refused(tmp_path: Path) -> None:
    agents = [
        p.args
        for p in plan(agents=3, data_dir=tmp_path, auto_ports=True, engines=("chromium", "firefox"))
        if p.service == "browser_agent"
    ]
    assert [a[a.index("--engine") + 1] for a in agents] == ["chromium", "firefox", "chromium"]
    assert not any("--engine" in p.args for p in plan(agents=1, data_dir=tmp_path, auto_ports=True))
    with pytest.raises(
        local.ClusterError, match="unknown browser engine 'safari'; engines: chromium, firefox"
    ):
        plan(agents=1, data_dir=tmp_path, auto_ports=True, engines=("safari",))
