"""The browser engines an agent can run: the names the agents, placement and reports share."""

from __future__ import annotations

ENGINES = ("chromium", "firefox")
"""Chromium (under chromedriver) and Firefox (over WebDriver BiDi)."""
