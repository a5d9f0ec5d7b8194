"""Errors of the reference platform (lab only)."""

from __future__ import annotations

from appliance.errors import VsaError


class LabPlatformError(VsaError):
    """The reference platform refused an administrative operation or its data is unusable."""
