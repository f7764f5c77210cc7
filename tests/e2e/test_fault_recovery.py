"""A fault injected with grpcurl into a running local cluster, and the recovery it causes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
import webshard
from webshard.cli.local import LocalCluster
from webshard.recovery.v1 import recovery_pb2

from tests.conftest import browser_cluster
from tests.integration.test_inference import cosine, reference_embeddings
from tests.integration.test_services import GRPCURL

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with browser_cluster(tmp_path_factory.mktemp("cluster"), agents=2) as local:
        yield local


def test_grpcurl_browser_crash_is_recovered_and_answers_stay_correct(cluster: LocalCluster) -> None:
    sentence = "Recovery must be measured, not assumed."
    [expected] = reference_embeddings([sentence])
    with webshard.Client(cluster.coordinators(), timeout=120) as client:
        client.deploy(
            "minilm-l6", sharding="layer", shards=2, replicas=2, runtime="browser", ep="wasm"
        )
        before = client.infer("minilm-l6", texts=[sentence])
        assert cosine(before.outputs["sentence_embedding"][0], expected) >= 0.99999

        spec = {
            "spec": {
                "kind": "FAULT_KIND_BROWSER_CRASH",
                "intensity": "INTENSITY_MODERATE",
                "target": {
                    "kind": "TARGET_KIND_BROWSER",
                    "ids": ["agent-0/browser-0"],
                    "mode": "SELECTOR_MODE_ALL",
                },
                "duration": "10s",
            }
        }
        injected = subprocess.run(
            [
                GRPCURL,
                "-plaintext",
                "-d",
                json.dumps(spec),
                cluster.address("fault-injector"),
                "webshard.fault_injector.v1.FaultInjectorService/InjectFault",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert injected.returncode == 0, injected.stderr
        assert json.loads(injected.stdout)["fault"]["state"] == "FAULT_STATE_ACTIVE"

        # Requests keep answering correctly across the fault, from the other replicas.
        for _ in range(5):
            result = client.infer("minilm-l6", texts=[sentence])
            assert cosine(result.outputs["sentence_embedding"][0], expected) >= 0.99999

    with webshard.RecoveryClient(cluster.address("recovery"), timeout=60) as recovery:
        # The recovery shows in WatchRecoveries (the existing ones first, then changes).
        done = next(
            r
            for r in recovery.watch_recoveries(include_existing=True, timeout=60)
            if r.report.agent_id == "agent-0"
            and r.report.browser_id == "browser-0"
            and r.state == recovery_pb2.RECOVERY_STATE_SUCCEEDED
        )
        # The first symptom the agent sees is the page's socket closing or the
        # browser's process exiting, whichever comes first; both name the crash.
        assert done.report.kind in (
            recovery_pb2.FAILURE_KIND_STREAM_BROKEN,
            recovery_pb2.FAILURE_KIND_RENDERER_CRASH,
        )
        # (or a request's hop in flight to it, when one was: the data path reports first).
        assert done.report.source in (
            recovery_pb2.FAILURE_SOURCE_PAGE,
            recovery_pb2.FAILURE_SOURCE_AGENT,
            recovery_pb2.FAILURE_SOURCE_DATA_PATH,
        )
        assert done.trace_id
        assert [p.name for p in done.phases][-1] == "verify"
        assert done.duration.ToMilliseconds() >= 0

    # The crash was real: the agent retired the dead browser (its process tree reaped).
    status = subprocess.run(
        [
            GRPCURL,
            "-plaintext",
            cluster.address("agent-0"),
            "webshard.browser_agent.v1.BrowserAgentService/GetStatus",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    browsers = {b["browserId"]: b["state"] for b in json.loads(status.stdout)["browsers"]}
    assert "browser-0" not in browsers, browsers
