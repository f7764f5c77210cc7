"""Every service's --help prints: argparse formats help texts with %, so a stray % breaks it."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest

from services.common.settings import ServerSettings, load_settings

SERVICES = Path(__file__).resolve().parents[2] / "services"


def settings_types() -> list[type[ServerSettings]]:
    """Every settings dataclass of every service (services/*/settings.py), common included."""
    found: dict[str, type[ServerSettings]] = {}
    for path in sorted(SERVICES.glob("*/settings.py")):
        module = importlib.import_module(f"services.{path.parent.name}.settings")
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, ServerSettings) and dataclasses.is_dataclass(value):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return list(found.values())


def test_every_service_has_its_settings_found() -> None:
    modules = {cls.__module__ for cls in settings_types()}
    assert {f"services.{p.parent.name}.settings" for p in SERVICES.glob("*/settings.py")} <= modules


@pytest.mark.parametrize("cls", settings_types(), ids=lambda cls: cls.__module__)
def test_help_prints_every_setting(
    cls: type[ServerSettings], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        load_settings(cls, ["--help"], env={}, prog="webshard-x", description="help test")
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    for field in dataclasses.fields(cls):
        assert "--" + field.name.replace("_", "-") in printed
        assert f"WEBSHARD_{field.name.upper()}" in printed
