"""The ``webshard`` command line.

webshard up       start a local cluster on loopback and keep it running
webshard status   list the local cluster's processes and their health
webshard deploy   cut a model into shards and place them on the agents
webshard infer    run a request through a deployed model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from webshard.cli.local import (
    ENGINES,
    ClusterError,
    LocalCluster,
    default_data_dir,
    local_coordinators,
    parse_engines,
    status,
)
from webshard.errors import RPCError
from webshard.options import CLUSTER_TOKEN_ENV


def _up(args: argparse.Namespace) -> int:
    try:
        cluster = LocalCluster(
            agents=args.agents,
            data_dir=args.data_dir,
            host=args.host,
            auto_ports=args.ports == "auto",
            extra_args={
                "browser_agent": [
                    "--browsers",
                    str(args.browsers),
                    "--standby-browsers",
                    str(args.standby),
                ]
            },
            engines=args.engines,
        )
    except ClusterError as exc:
        print(f"webshard up: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    # Ctrl-C and SIGTERM both stop the cluster; install the handlers before any
    # child starts so no signal can slip between start and wait.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"starting a local cluster in {cluster.data_dir} ...", flush=True)
    try:
        cluster.start(timeout=args.timeout)
    except ClusterError as exc:
        print(f"webshard up: {exc}", file=sys.stderr)
        return 1
    width = max(len(p.name) for p in cluster.processes)
    for proc in cluster.processes:
        print(f"  {proc.name:<{width}}  {proc.address:<21}  pid {proc.pid:<7}  SERVING")
    if url := cluster.dashboard_url():
        print(f"dashboard: {url}")
    print(f"logs: {cluster.data_dir / 'logs'}", flush=True)
    if args.once:
        print("all processes SERVING; stopping (--once)", flush=True)
    else:
        print("webshard is up; Ctrl-C or SIGTERM stops it", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping ...", flush=True)
    cluster.stop()
    print("stopped", flush=True)
    return 0


def _status(args: argparse.Namespace) -> int:
    rows = status(args.data_dir)
    if args.json:
        print(json.dumps({"data_dir": str(args.data_dir), "processes": rows}, indent=2))
    elif not rows:
        print(f"no local cluster is running from {args.data_dir}")
    else:
        width = max(len(str(r["name"])) for r in rows)
        for row in rows:
            print(
                f"{row['name']!s:<{width}}  {row['address']!s:<21}  "
                f"pid {row['pid']!s:<7}  {row['health']}"
            )
    if not rows:
        return 1
    return 0 if all(r["health"] == "SERVING" for r in rows) else 1


def _target(args: argparse.Namespace) -> str:
    """--target, else the local cluster's coordinators, else the default ports."""
    if args.target:
        return str(args.target)
    return (
        ",".join(local_coordinators(args.data_dir))
        or "127.0.0.1:50051,127.0.0.1:50061,127.0.0.1:50071"
    )


def _token(args: argparse.Namespace) -> str | None:
    """--token, else $WEBSHARD_CLUSTER_TOKEN; None when neither is set."""
    return str(args.token or os.environ.get(CLUSTER_TOKEN_ENV, "")) or None


def _deploy(args: argparse.Namespace) -> int:
    from webshard.client import Client

    with Client(_target(args), token=_token(args), timeout=args.timeout) as client:
        placement = client.deploy(
            args.model,
            sharding=args.sharding,
            shards=args.shards,
            replicas=args.replicas,
            runtime=args.runtime,
            ep=args.ep,
            spares=args.spares,
            engines=args.engines,
        )
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(placement), indent=2))
        return 0
    print(f"{placement.model}: {len(placement.shards)} shard(s), version {placement.version}")
    for shard in placement.shards:
        where = ", ".join(
            f"{r.agent_id}/{r.browser_id} ({_ep_name(r.execution_provider)}"
            + (f", {r.engine})" if r.engine else ")")
            for r in shard.replicas
        )
        spare = "".join(f", spare {r.agent_id}/{r.browser_id}" for r in shard.spares)
        print(
            f"  shard {shard.shard.index}  {shard.shard.size_bytes / 1e6:8.2f} MB  {where}{spare}"
        )
    return 0


def _ep_name(value: int) -> str:
    from webshard.common.v1 import common_pb2

    return common_pb2.ExecutionProvider.Name(value).removeprefix("EXECUTION_PROVIDER_").lower()  # type: ignore[arg-type]


def _infer(args: argparse.Namespace) -> int:
    from webshard.client import Client

    with Client(_target(args), token=_token(args), timeout=args.timeout) as client:
        result = client.infer(args.model, texts=args.text)
    if args.json:
        print(
            json.dumps(
                {
                    "request_id": result.request_id,
                    "outputs": {k: v.tolist() for k, v in result.outputs.items()},
                    "trail": [dataclasses.asdict(hop) for hop in result.trail],
                    "total_ms": result.total_ms,
                    "recovered": result.recovered,
                },
                indent=2,
            )
        )
        return 0
    for name, value in result.outputs.items():
        print(
            f"{name}: shape {list(value.shape)}  first values {value.ravel()[:4].round(5).tolist()}"
        )
    for hop in result.trail:
        print(
            f"  shard {hop.shard_index}  {hop.agent_id}/{hop.browser_id}  {hop.execution_provider}"
            f"  compute {hop.compute_ms:.2f} ms  hop {hop.hop_ms:.2f} ms  attempts {hop.attempts}"
        )
    print(f"total {result.total_ms:.2f} ms")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``webshard`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="webshard",
        description="Run models sharded across browsers, break them on purpose, measure recovery.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def data_dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data-dir",
            type=Path,
            default=default_data_dir(),
            help="the local cluster's directory (state file, logs, data) [default: %(default)s]",
        )

    up = sub.add_parser("up", help="start a local cluster on loopback")
    up.add_argument("--agents", type=int, default=2, help="browser agents to start [2]")
    up.add_argument("--browsers", type=int, default=1, help="headless browsers per agent [1]")
    up.add_argument(
        "--engines",
        type=parse_engines,
        default=["chromium"],
        help=f"browser engines, comma-separated, that the agents take in turn "
        f"({', '.join(ENGINES)}) [chromium]",
    )
    up.add_argument(
        "--standby", type=int, default=0, help="pre-launched standby browsers per agent [0]"
    )
    up.add_argument("--host", default="127.0.0.1", help="address to listen on [127.0.0.1]")
    up.add_argument(
        "--ports",
        choices=("default", "auto"),
        default="default",
        help="default: each service's own port (coordinators 50051/50061/50071, agents "
        "50052/50062/..., fault-injector 50053, recovery 50054, metrics 50055); auto: free ports",
    )
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for SERVING")
    up.add_argument("--once", action="store_true", help="stop as soon as every process is SERVING")
    data_dir_arg(up)
    up.set_defaults(func=_up)

    st = sub.add_parser("status", help="list the local cluster's processes and their health")
    st.add_argument("--json", action="store_true", help="print JSON")
    data_dir_arg(st)
    st.set_defaults(func=_status)

    def target_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--target",
            help="coordinator address(es), comma-separated [the local cluster's]",
        )
        p.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds [120]")
        p.add_argument(
            "--token",
            help=f"the cluster token, for a cluster that requires one [${CLUSTER_TOKEN_ENV}]",
        )
        p.add_argument("--json", action="store_true", help="print JSON")
        data_dir_arg(p)

    dep = sub.add_parser("deploy", help="cut a model into shards and place them on the agents")
    dep.add_argument("model", help="model name, for example minilm-l6")
    dep.add_argument("--shards", type=int, default=1, help="number of shards [1]")
    dep.add_argument(
        "--sharding",
        default="layer",
        choices=("layer", "attention_feedforward", "component"),
        help="where to cut [layer]",
    )
    dep.add_argument("--replicas", type=int, default=1, help="copies of each shard [1]")
    dep.add_argument(
        "--spares",
        type=int,
        default=None,
        help="hot spares per shard, loaded and warmed, taking no traffic "
        "[default: one where the fleet has room; 0: none]",
    )
    dep.add_argument("--runtime", choices=("native", "browser"), help="where shards run")
    dep.add_argument("--ep", choices=("webgpu", "webnn", "wasm", "cpu"), help="pin a provider")
    dep.add_argument(
        "--engines",
        type=parse_engines,
        default=[],
        help=f"browser engines the model may run on, comma-separated ({', '.join(ENGINES)}); "
        "with more than one its shards are spread over them [any]",
    )
    target_args(dep)
    dep.set_defaults(func=_deploy)

    inf = sub.add_parser("infer", help="run a request through a deployed model")
    inf.add_argument("model", help="the deployed model's name")
    inf.add_argument(
        "--text", action="append", required=True, help="input text; repeat for a batch"
    )
    target_args(inf)
    inf.set_defaults(func=_infer)

    camp = sub.add_parser(
        "campaign",
        help="the fault-tolerance campaign: every scenario under every recovery strategy",
    )
    try:
        # The campaign checks answers against the model's reference, so it needs the
        # services package (the model library); the SDK alone cannot run it.
        from services.campaign import cli as campaign_cli
    except ImportError:
        camp.set_defaults(func=_campaign_unavailable)
    else:
        campaign_cli.add_arguments(camp)
        camp.set_defaults(func=campaign_cli.main)
    return parser


def _campaign_unavailable(args: argparse.Namespace) -> int:
    print(
        "webshard campaign needs the webshard-services package (pip install the repository "
        "root) to check answers against the reference",
        file=sys.stderr,
    )
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``webshard`` command."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except RPCError as exc:
        print(f"webshard {args.command}: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
