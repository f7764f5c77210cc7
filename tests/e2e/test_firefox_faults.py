"""Faults on a Firefox fleet: the fault hooks done for real on Firefox, recovered.

minilm-l6 in 3 layer shards, 2 replicas each, over 3 agents that each run one
headless Firefox (over WebDriver BiDi) and keep one warm standby; each kind is
checked as the Chromium fault matrix checks it (``assert_recovered``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import webshard

from services.campaign.runner import Addresses
from tests.conftest import NEEDS_FIREFOX, attached_cluster
from tests.e2e.test_fault_matrix import KINDS, assert_recovered

pytestmark = [pytest.mark.browser, NEEDS_FIREFOX]


@pytest.fixture(scope="module")
def addresses(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Addresses]:
    with attached_cluster(
        tmp_path_factory.mktemp("cluster"),
        3,
        ["--browsers", "1", "--standby-browsers", "1", "--native", "false"],
        engines=("firefox",),
    ) as cluster:
        yield Addresses.of(cluster)


def test_every_agent_runs_firefox(addresses: Addresses) -> None:
    with webshard.Client(addresses.coordinators, timeout=30) as client:
        engines = {b.capabilities.engine for a in client.list_agents() for b in a.browsers}
    assert engines == {"firefox"}


@pytest.mark.parametrize("kind", KINDS)
def test_a_fault_on_firefox_is_recovered_and_answers_stay_correct(
    addresses: Addresses, kind: str
) -> None:
    assert_recovered(addresses, kind, "simple")
