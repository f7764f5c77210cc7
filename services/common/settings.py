"""Settings from WEBSHARD_* environment variables, with command-line flags overriding them.

Each service declares its settings as a dataclass whose fields carry a ``help`` text in
their metadata. ``load_settings`` reads, for every field, the environment variable
``WEBSHARD_<FIELD>`` and then the flag ``--<field>`` (underscores as hyphens); a value
that does not parse stops the process with a message naming the variable or flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

ENV_PREFIX = "WEBSHARD_"

T = TypeVar("T")


def setting(default: Any, help: str) -> Any:
    """Declare a settings field with its default and a help text."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ServerSettings:
    """Settings every service shares."""

    host: str = setting("127.0.0.1", "Address to listen on; 0.0.0.0 in a container.")
    port: int = setting(0, "gRPC port; 0 picks the service's default port.")
    log_level: str = setting("INFO", "Log level: DEBUG, INFO, WARNING or ERROR.")
    otlp_endpoint: str = setting(
        "",
        "OTLP/gRPC endpoint for traces (for example http://127.0.0.1:4317); "
        "empty keeps spans local.",
    )
    drain_grace_s: float = setting(
        5.0, "Seconds in-flight calls get to finish after SIGTERM before they are cancelled."
    )
    data_dir: str = setting("", "Directory for the service's files; empty uses a temporary one.")
    cluster_token: str = setting(
        "",
        "When set, calls that change the cluster's state must carry "
        "'authorization: Bearer <token>' metadata, and the service sends it on its own calls "
        "to the other services; empty checks nothing (anyone who can reach the port may "
        "deploy, replace shards or vote in elections).",
    )

    def validate(self) -> None:
        """Raise SettingsError when a value is out of range; services extend this."""
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port {self.port} is outside 0..65535")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError(
                f"log level {self.log_level!r} is not DEBUG, INFO, WARNING or ERROR"
            )
        if self.drain_grace_s < 0:
            raise SettingsError(f"drain grace {self.drain_grace_s} s is negative")


class SettingsError(ValueError):
    """A setting's value does not parse or is out of range."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse(kind: Any, raw: str, source: str) -> Any:
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            return raw
        if origin is list:
            return [part.strip() for part in raw.split(",") if part.strip()]
    except ValueError:
        raise SettingsError(
            f"{source}={raw!r} is not a valid {getattr(kind, '__name__', kind)}"
        ) from None
    if isinstance(kind, types.UnionType):
        raise SettingsError(f"{source}: optional settings are not supported")
    raise SettingsError(f"{source}: unsupported setting type {kind!r}")


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per settings field (defaults come from elsewhere)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        env = ENV_PREFIX + field.name.upper()
        parser.add_argument(
            flag,
            dest=field.name,
            default=None,
            metavar=field.name.upper(),
            help=f"{field.metadata.get('help', '')} [env {env}]",
        )
    return parser


def load_settings(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    prog: str = "webshard",
    description: str = "",
) -> T:
    """Build ``cls`` from its defaults, then ``WEBSHARD_*`` variables, then flags.

    Raises SettingsError for a value that does not parse.
    """
    env = os.environ if env is None else env
    kinds = _field_types(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = ENV_PREFIX + field.name.upper()
        if name in env:
            values[field.name] = _parse(kinds[field.name], env[name], name)
    parser = build_parser(cls, prog, description)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = getattr(args, field.name)
        if raw is not None:
            flag = "--" + field.name.replace("_", "-")
            values[field.name] = _parse(kinds[field.name], raw, flag)
    settings = cls(**values)
    validate = getattr(settings, "validate", None)
    if validate is not None:
        validate()
    return settings
