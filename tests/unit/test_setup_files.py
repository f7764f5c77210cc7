"""`make setup` must leave a fresh clone clean: what it installs is pinned by committed files."""

from __future__ import annotations

import json
import re

from tests.conftest import REPO


def test_lockfile_lists_every_optional_platform_package() -> None:
    # npm writes the optional per-platform packages (buf's binaries) into the lock
    # when it installs; a lock without them is rewritten by the first install.
    lock = json.loads((REPO / "package-lock.json").read_text())
    packages = lock["packages"]
    missing = [
        f"{name} -> {optional}"
        for name, entry in packages.items()
        for optional in entry.get("optionalDependencies", {})
        if f"node_modules/{optional}" not in packages
    ]
    assert not missing, f"package-lock.json lacks optional packages: {missing}"


def test_setup_installs_from_the_lockfile_without_rewriting_it() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^\tnpm ci\b", makefile, re.MULTILINE), "setup must use `npm ci`"
    assert not re.search(r"^\tnpm install\b", makefile, re.MULTILINE)
