"""The knowledge base's errors: one family, a class per reason an operator can act on.

Every refusal of a bundle is a :class:`BundleRefused` subclass whose message says
what was wrong in words (the console and the poll report it as is); the old
bundle stays installed whatever is raised here.
"""

from __future__ import annotations

from appliance.errors import VsaError


class KbError(VsaError):
    """Root of the knowledge-base family (bundle download, install, loading, matching)."""


class KbFormatError(KbError):
    """A bundle file is not gzip-compressed JSON Lines of OSV records."""


class BundleRefused(KbError):
    """A signatures bundle offered by the platform was not installed; the old one stays in use."""

    reason = "refused"

    def __init__(self, message: str, *, version: str | None = None) -> None:
        super().__init__(message)
        self.version = version


class BundleOfferInvalid(BundleRefused):
    """The poll's ``signatures`` object is malformed (missing field, bad hex/base64)."""

    reason = "invalid_offer"


class BundleOriginRefused(BundleRefused):
    """The bundle URL is not a path on the platform's own origin."""

    reason = "other_origin"


class BundleDownloadFailed(BundleRefused):
    """The download failed: HTTP error, connection cut, timeout, or fewer bytes than announced."""

    reason = "download_failed"


class BundleTooLarge(BundleRefused):
    """The bundle is larger than the appliance accepts (256 MiB by PROTOCOL.md)."""

    reason = "too_large"


class BundleDigestMismatch(BundleRefused):
    """The SHA-256 of the downloaded bytes is not the one the platform announced."""

    reason = "digest_mismatch"


class BundleSignatureInvalid(BundleRefused):
    """The Ed25519 signature does not verify against the configured public key."""

    reason = "bad_signature"


class BundleContentInvalid(BundleRefused):
    """The bundle verified but is not gzip JSON Lines of OSV records."""

    reason = "bad_content"


class BundleInstallFailed(BundleRefused):
    """The verified bundle could not be written into the state directory."""

    reason = "install_failed"
