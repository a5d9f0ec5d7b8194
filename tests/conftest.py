"""Shared fixtures: prerequisites that fail in CI instead of skipping, and the netns lab."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from appliance.console import forget_secrets
from appliance.lab.netns import NetnsLab, lab_available

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, why: str) -> None:
    """Skip locally, fail in CI: in CI a missing prerequisite is a failure (brief)."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {why}")
    pytest.skip(why)


def require_tool(name: str) -> str:
    """The path of an executable, or skip/fail as :func:`require` does."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/lib/squid/{name}") if os.path.exists(p)), None
    )
    require(path is not None, f"{name} is not installed (scripts/setup installs it)")
    assert path is not None
    return path


@pytest.fixture
def netns_lab() -> Iterator[NetnsLab]:
    """A fresh namespace lab (hub + bridge), deleted after the test whatever happens."""
    reason = lab_available()
    require(reason is None, reason or "")
    with NetnsLab() as lab:
        yield lab


@pytest.fixture(autouse=True)
def _no_leftover_secrets() -> Iterator[None]:
    """Every test starts with an empty secret registry."""
    forget_secrets()
    yield
    forget_secrets()
