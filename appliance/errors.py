"""The appliance's errors: one root, one family per concern.

Each error carries words an operator can act on; raise them ``from`` the
underlying cause so the journal keeps the detail.
"""

from __future__ import annotations


class VsaError(Exception):
    """Root of every error the appliance raises on purpose."""


class ConfigError(VsaError):
    """The configuration file or environment holds an invalid value."""


class UserDataError(VsaError):
    """User-data (PERSCODE, PROXY_URL) cannot be decoded or parsed."""


class ImdsError(VsaError):
    """The instance metadata service could not answer."""


class PlatformError(VsaError):
    """The platform could not be reached or refused a request."""


class StateError(VsaError):
    """The state directory cannot be read or written."""
