"""The EC2 instance metadata service (IMDS) client: one small typed interface.

RUNTIME.md, IMDS: IMDSv2 first (``PUT /latest/api/token`` with a TTL of
21600 s, the token reused and refreshed before it expires, dropped and fetched
again on a ``401``); IMDSv1 only when the token call is answered ``404`` or
``405`` (a service that predates v2). ``403`` means the endpoint is disabled
(``HttpEndpoint=enabled``). A token call that times out while a v1 GET is
answered ``401`` is the hop-limit problem (``HttpPutResponseHopLimit``).
Short timeouts, a few retries with backoff, ``Retry-After`` honoured within a
bound; IMDS being down is an error value for the caller to retry, never a crash.

The metadata address is link-local: requests never go through a proxy
(``trust_env=False``), whatever ``HTTP_PROXY`` says.

The token is a secret: it is registered with :func:`appliance.console.register_secret`
as soon as it arrives and never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Literal

import aiohttp
from yarl import URL

from appliance.config import DEFAULT_IMDS_ENDPOINT, Config
from appliance.console import register_secret
from appliance.errors import ImdsError
from appliance.platform.retry import parse_retry_after

log = logging.getLogger("vsa.imds")

TOKEN_PATH = "/latest/api/token"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
# The longest TTL IMDS grants (AWS documentation, "Use IMDSv2"): one token
# then serves six hours of calls.
TOKEN_TTL_S = 21600
# Refresh a token this long before it expires (at most a tenth of its life),
# so that a call never races the expiry.
TOKEN_REFRESH_MARGIN_S = 60.0
TIMEOUT_S = 1.0
ATTEMPTS = 3
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 2.0
# A Retry-After beyond this is clamped: IMDS is local, a long wait means trouble.
RETRY_AFTER_MAX_S = 5.0
# User-data is at most 16 KiB on EC2; identity documents are small. Anything
# much larger is not IMDS talking.
MAX_RESPONSE_BYTES = 1 << 20
# Answers worth another attempt: throttling and transient server trouble.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})

ImdsVersion = Literal["v2", "v1"]

_DISABLED_FIX = (
    "enable the instance metadata service: aws ec2 modify-instance-metadata-options "
    "--instance-id <id> --http-endpoint enabled (HttpEndpoint=enabled)"
)
_HOP_LIMIT_FIX = (
    "raise the token response hop limit: aws ec2 modify-instance-metadata-options "
    "--instance-id <id> --http-put-response-hop-limit 2 (HttpPutResponseHopLimit)"
)
_UNREACHABLE_FIX = (
    "check that this is an EC2 instance whose metadata service is reachable at {endpoint} "
    "(no firewall rule blocking it); the appliance keeps retrying"
)


# --- errors: each names what failed and what the operator should do ---


class ImdsDisabledError(ImdsError):
    """IMDS answered 403: the metadata endpoint is disabled for this instance."""

    def __init__(self, endpoint: str, path: str) -> None:
        self.endpoint = endpoint
        self.path = path
        self.fix = _DISABLED_FIX
        super().__init__(
            f"the instance metadata service at {endpoint} is disabled "
            f"(403 Forbidden on {path}) - please fix: {self.fix}"
        )


class ImdsHopLimitError(ImdsError):
    """The IMDSv2 token request timed out while IMDSv1 answered 401 (tokens required)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.fix = _HOP_LIMIT_FIX
        super().__init__(
            f"the IMDSv2 token request to {endpoint} timed out while IMDSv1 answered "
            "401 (tokens required): the token response does not reach the appliance, "
            f"it is one network hop too far - please fix: {self.fix}"
        )


class ImdsUnreachableError(ImdsError):
    """IMDS did not answer (refused, timed out, or kept answering 5xx/429) after bounded retries."""

    def __init__(self, endpoint: str, path: str, attempts: int, cause: str) -> None:
        self.endpoint = endpoint
        self.path = path
        self.attempts = attempts
        self.cause = cause
        self.fix = _UNREACHABLE_FIX.format(endpoint=endpoint)
        super().__init__(
            f"the instance metadata service at {endpoint} did not answer {path} "
            f"after {attempts} attempts ({cause}) - please fix: {self.fix}"
        )


class ImdsResponseError(ImdsError):
    """IMDS answered something this client cannot use (status, size or content)."""

    def __init__(self, endpoint: str, path: str, problem: str) -> None:
        self.endpoint = endpoint
        self.path = path
        self.fix = "check the instance metadata service; the appliance keeps retrying"
        super().__init__(f"the instance metadata service at {endpoint}: {path}: {problem}")


# --- pure pieces: retry policy, listings, facts ---


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry one IMDS call: a value, not callbacks."""

    attempts: int = ATTEMPTS
    base_delay_s: float = BACKOFF_BASE_S
    max_delay_s: float = BACKOFF_MAX_S
    max_retry_after_s: float = RETRY_AFTER_MAX_S

    def delay_s(
        self, failed_attempt: int, retry_after: str | None = None, jitter: float = 1.0
    ) -> float:
        """The pause after ``failed_attempt`` (1-based); ``jitter`` in [0, 1] scales the upper half.

        ``Retry-After`` wins when present, clamped to ``max_retry_after_s``;
        otherwise exponential backoff with "equal jitter" (half fixed, half random).
        """
        asked = parse_retry_after(retry_after)
        if asked is not None:
            return min(asked, self.max_retry_after_s)
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (failed_attempt - 1))
        return ceiling / 2 + ceiling / 2 * min(max(jitter, 0.0), 1.0)

    def worst_case_s(self, timeout_s: float) -> float:
        """The longest one call can take: every attempt timing out, every pause at its cap."""
        pauses = sum(
            max(self.max_retry_after_s, min(self.max_delay_s, self.base_delay_s * 2 ** (n - 1)))
            for n in range(1, self.attempts)
        )
        return self.attempts * timeout_s + pauses


def parse_listing(text: str) -> list[str]:
    """Entries of an IMDS directory listing (one per line), without the ``/`` of subdirectories."""
    return [line.strip().rstrip("/") for line in text.splitlines() if line.strip()]


def token_refresh_margin_s(ttl_s: float) -> float:
    """How long before expiry a token of ``ttl_s`` seconds is replaced."""
    return min(TOKEN_REFRESH_MARGIN_S, ttl_s / 10)


@dataclass(frozen=True)
class InstanceFacts:
    """The ``instance`` object of PROTOCOL.md's register request; None where IMDS is silent."""

    instance_id: str | None
    region: str | None
    account_id: str | None
    availability_zone: str | None
    image_id: str | None
    instance_type: str | None
    private_ip: str | None
    mac: str | None
    vpc_id: str | None
    subnet_id: str | None

    def to_json(self) -> dict[str, str | None]:
        """The wire form (PROTOCOL.md, POST /vsa/v1/register, ``instance``)."""
        return asdict(self)


# Identity-document keys for the facts it carries (AWS documentation,
# "Instance identity documents").
_DOCUMENT_KEYS = {
    "instance_id": "instanceId",
    "region": "region",
    "account_id": "accountId",
    "availability_zone": "availabilityZone",
    "image_id": "imageId",
    "instance_type": "instanceType",
    "private_ip": "privateIp",
}
# Where meta-data has the same fact, for a document that lacks it.
_METADATA_FALLBACKS = {
    "instance_id": "meta-data/instance-id",
    "region": "meta-data/placement/region",
    "availability_zone": "meta-data/placement/availability-zone",
    "image_id": "meta-data/ami-id",
    "instance_type": "meta-data/instance-type",
    "private_ip": "meta-data/local-ipv4",
}


def facts_from_document(document: Mapping[str, Any]) -> dict[str, str | None]:
    """The facts an identity document provides (non-empty strings only)."""
    facts: dict[str, str | None] = {}
    for field_name, key in _DOCUMENT_KEYS.items():
        value = document.get(key)
        facts[field_name] = value if isinstance(value, str) and value else None
    return facts


# --- the client ---


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    headers: Mapping[str, str]


class _Timeout(Exception):
    """One request timed out (internal)."""


class _Unreachable(Exception):
    """One request failed at the connection level (internal)."""


class ImdsClient:
    """An async IMDS client: IMDSv2 with a cached token, v1 only where v2 is absent.

    Use as ``async with ImdsClient() as imds: await imds.probe()``. Every public
    coroutine raises only :class:`appliance.errors.ImdsError` subclasses:
    :class:`ImdsDisabledError`, :class:`ImdsHopLimitError`,
    :class:`ImdsUnreachableError` (retry later) and :class:`ImdsResponseError`.
    """

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        timeout_s: float = TIMEOUT_S,
        attempts: int = ATTEMPTS,
        backoff_s: float = BACKOFF_BASE_S,
        max_retry_after_s: float = RETRY_AFTER_MAX_S,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Prepare a client; nothing is sent until the first call.

        ``session``, when given, must have ``trust_env=False`` (IMDS never goes
        through a proxy) and stays the caller's to close.
        """
        url = URL(endpoint or DEFAULT_IMDS_ENDPOINT)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"IMDS endpoint must be an http:// URL with a host, not {endpoint!r}")
        if attempts < 1 or timeout_s <= 0:
            raise ValueError("IMDS attempts must be >= 1 and timeout_s > 0")
        if session is not None and session.trust_env:
            raise ValueError(
                "the IMDS session must not read proxies from the environment (trust_env=False)"
            )
        self.endpoint = str(url.origin())
        self._base = url.origin()
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._timeout_s = timeout_s
        self.policy = RetryPolicy(
            attempts=attempts,
            base_delay_s=backoff_s,
            max_delay_s=max(BACKOFF_MAX_S, backoff_s),
            max_retry_after_s=max_retry_after_s,
        )
        self._session = session
        self._owns_session = session is None
        self._clock = clock
        self._lock = asyncio.Lock()
        self._version: ImdsVersion | None = None
        self._token: str | None = None
        self._token_refresh_at = 0.0
        self.version_reason: str | None = None
        """Why the version in use was chosen, in words for the console (None before the probe)."""

    @classmethod
    def from_config(cls, config: Config, **options: Any) -> ImdsClient:
        """A client for ``config.imds_endpoint`` (``AWS_EC2_METADATA_SERVICE_ENDPOINT``)."""
        return cls(endpoint=config.imds_endpoint, **options)

    async def __aenter__(self) -> ImdsClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session if this client created it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def version(self) -> ImdsVersion | None:
        """The IMDS version in use, or None before the first successful probe."""
        return self._version

    # --- public calls ---

    async def probe(self) -> ImdsVersion:
        """Find out which IMDS version this instance offers (fetching a token for v2)."""
        await self._credentials()
        assert self._version is not None
        return self._version

    async def get_bytes(self, path: str) -> bytes | None:
        """The raw body at ``path`` (``meta-data/...`` or ``/latest/...``), or None on 404."""
        full = _full_path(path)
        for refetched in (False, True):
            headers, used_token = await self._credentials()
            answer = await self._get(full, headers)
            if answer.status == 200:
                return answer.body
            if answer.status == 404:
                return None
            # 401: the token expired or was revoked, or the service now wants
            # tokens (v1 chosen earlier). Drop what we used and try once more.
            if refetched:
                raise ImdsResponseError(
                    self.endpoint, full, "401 Unauthorized even with a fresh token"
                )
            log.info("IMDS answered 401 on %s: fetching a new token", full)
            await self._invalidate(used_token)
        raise AssertionError("unreachable")  # pragma: no cover

    async def get_text(self, path: str) -> str | None:
        """The text at ``path`` (``meta-data/instance-id``, ``/latest/...``), or None on 404."""
        body = await self.get_bytes(path)
        if body is None:
            return None
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ImdsResponseError(
                self.endpoint, _full_path(path), "the answer is not UTF-8 text"
            ) from exc

    async def user_data(self) -> bytes | None:
        """The instance's user-data exactly as stored (maybe gzip or base64), or None if there is none."""
        return await self.get_bytes("user-data")

    async def identity_document(self) -> tuple[str, dict[str, Any]]:
        """The instance identity document: its raw text (sent to the platform as is) and parsed."""
        found = await self._identity_document_or_none()
        if found is None:
            raise ImdsResponseError(
                self.endpoint, "/latest/dynamic/instance-identity/document", "404 Not Found"
            )
        return found

    async def identity_pkcs7(self) -> str | None:
        """The PKCS7 signature of the identity document (base64 text), or None if absent."""
        text = await self.get_text("dynamic/instance-identity/pkcs7")
        return text.strip() if text is not None else None

    async def instance_facts(self) -> InstanceFacts:
        """The facts PROTOCOL.md's registration needs: identity document first, meta-data for the rest."""
        found = await self._identity_document_or_none()
        facts = facts_from_document(found[1]) if found else dict.fromkeys(_DOCUMENT_KEYS)
        for field_name, path in _METADATA_FALLBACKS.items():
            if facts.get(field_name) is None:
                facts[field_name] = await self._text_value(path)
        mac = await self._text_value("meta-data/mac")
        vpc_id = subnet_id = None
        if mac is not None:
            vpc_id = await self._text_value(f"meta-data/network/interfaces/macs/{mac}/vpc-id")
            subnet_id = await self._text_value(f"meta-data/network/interfaces/macs/{mac}/subnet-id")
        return InstanceFacts(mac=mac, vpc_id=vpc_id, subnet_id=subnet_id, **facts)

    async def local_ipv4s(self) -> list[str]:
        """Every private IPv4 address of this instance, on every interface (no duplicates)."""
        addresses: list[str] = []
        primary = await self._text_value("meta-data/local-ipv4")
        if primary:
            addresses.append(primary)
        macs = await self.get_text("meta-data/network/interfaces/macs/")
        for mac in parse_listing(macs or ""):
            listed = await self.get_text(f"meta-data/network/interfaces/macs/{mac}/local-ipv4s")
            addresses.extend(parse_listing(listed or ""))
        return list(dict.fromkeys(addresses))

    # --- internals ---

    async def _text_value(self, path: str) -> str | None:
        text = await self.get_text(path)
        if text is None:
            return None
        return text.strip() or None

    async def _identity_document_or_none(self) -> tuple[str, dict[str, Any]] | None:
        path = "dynamic/instance-identity/document"
        raw = await self.get_text(path)
        if raw is None:
            return None
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            raise ImdsResponseError(
                self.endpoint, _full_path(path), "the identity document is not JSON"
            ) from exc
        if not isinstance(parsed, dict):
            raise ImdsResponseError(
                self.endpoint, _full_path(path), "the identity document is not a JSON object"
            )
        return raw, parsed

    async def _credentials(self) -> tuple[dict[str, str], str | None]:
        """Headers for a metadata GET (the token, for v2) and the token they carry."""
        async with self._lock:
            if self._version is None or (
                self._version == "v2"
                and (self._token is None or self._clock() >= self._token_refresh_at)
            ):
                await self._establish()
            if self._version == "v2":
                assert self._token is not None
                return {TOKEN_HEADER: self._token}, self._token
            return {}, None

    async def _invalidate(self, used_token: str | None) -> None:
        async with self._lock:
            if used_token is None:
                # A 401 to a tokenless GET: the service now requires tokens.
                if self._version == "v1":
                    self._version = None
            elif self._token == used_token:
                self._token = None

    async def _establish(self) -> None:
        """Fetch a token (v2), or decide on v1 where the service has no tokens. Lock held."""
        self._token = None
        last_problem = "no answer"
        timed_out = False
        for attempt in range(1, self.policy.attempts + 1):
            retry_after: str | None = None
            try:
                answer = await self._send("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: str(TOKEN_TTL_S)})
            except _Timeout:
                timed_out, last_problem = (
                    True,
                    f"the token request timed out after {self._timeout_s:g} s",
                )
            except _Unreachable as exc:
                timed_out, last_problem = False, str(exc)
            else:
                if answer.status == 200:
                    self._accept_token(answer)
                    return
                if answer.status in (404, 405):
                    self._choose_v1(
                        f"the token request was answered {answer.status} (a service without IMDSv2)"
                    )
                    return
                if answer.status == 403:
                    raise ImdsDisabledError(self.endpoint, TOKEN_PATH)
                if answer.status not in RETRYABLE_STATUSES:
                    raise ImdsResponseError(
                        self.endpoint,
                        TOKEN_PATH,
                        f"unexpected answer {answer.status} to the token request",
                    )
                timed_out, last_problem = False, f"answered {answer.status}"
                retry_after = answer.headers.get("Retry-After")
            if attempt < self.policy.attempts:
                await asyncio.sleep(self.policy.delay_s(attempt, retry_after, random.random()))
        if timed_out:
            await self._diagnose_put_timeout()
            return
        raise ImdsUnreachableError(self.endpoint, TOKEN_PATH, self.policy.attempts, last_problem)

    async def _diagnose_put_timeout(self) -> None:
        """The token PUT never came back: is it the hop limit (v1 says 401) or a v1-only path?"""
        path = "/latest/meta-data/instance-id"
        try:
            answer = await self._send("GET", path, {})
        except (_Timeout, _Unreachable) as exc:
            raise ImdsUnreachableError(
                self.endpoint,
                TOKEN_PATH,
                self.policy.attempts,
                f"the token request timed out and a plain GET failed too: {exc}",
            ) from None
        if answer.status == 401:
            raise ImdsHopLimitError(self.endpoint)
        if answer.status == 403:
            raise ImdsDisabledError(self.endpoint, path)
        if answer.status in (200, 404):
            self._choose_v1("the IMDSv2 token request timed out but IMDSv1 answers")
            return
        raise ImdsUnreachableError(
            self.endpoint,
            TOKEN_PATH,
            self.policy.attempts,
            f"the token request timed out and a plain GET was answered {answer.status}",
        )

    def _accept_token(self, answer: _Answer) -> None:
        token = answer.body.decode("ascii", "replace").strip()
        if not token:
            raise ImdsResponseError(self.endpoint, TOKEN_PATH, "an empty token")
        register_secret(token)  # before anything could log it
        granted = answer.headers.get(TOKEN_TTL_HEADER, "")
        # Trust the TTL the service reports when it is shorter than asked.
        ttl_s = (
            float(min(int(granted), TOKEN_TTL_S))
            if granted.isdigit() and int(granted) > 0
            else float(TOKEN_TTL_S)
        )
        self._token = token
        self._token_refresh_at = self._clock() + ttl_s - token_refresh_margin_s(ttl_s)
        if self._version != "v2":
            self._version = "v2"
            self.version_reason = "IMDSv2 (session token)"
            log.info("IMDSv2 in use (token valid %g s)", ttl_s)
        else:
            log.debug("IMDSv2 token refreshed (valid %g s)", ttl_s)

    def _choose_v1(self, why: str) -> None:
        self._version = "v1"
        self.version_reason = f"IMDSv1: {why}"
        log.warning("IMDSv1 in use: %s", why)

    async def _get(self, path: str, headers: Mapping[str, str]) -> _Answer:
        """One metadata GET with bounded retries; returns 200, 401 and 404 answers."""
        last_problem = "no answer"
        for attempt in range(1, self.policy.attempts + 1):
            retry_after: str | None = None
            try:
                answer = await self._send("GET", path, headers)
            except (_Timeout, _Unreachable) as exc:
                last_problem = str(exc) or "timed out"
            else:
                if answer.status in (200, 401, 404):
                    return answer
                if answer.status == 403:
                    raise ImdsDisabledError(self.endpoint, path)
                if answer.status not in RETRYABLE_STATUSES:
                    raise ImdsResponseError(
                        self.endpoint, path, f"unexpected answer {answer.status}"
                    )
                last_problem = f"answered {answer.status}"
                retry_after = answer.headers.get("Retry-After")
            if attempt < self.policy.attempts:
                await asyncio.sleep(self.policy.delay_s(attempt, retry_after, random.random()))
        raise ImdsUnreachableError(self.endpoint, path, self.policy.attempts, last_problem)

    async def _send(self, method: str, path: str, headers: Mapping[str, str]) -> _Answer:
        """One request, never through a proxy; connection trouble becomes _Timeout/_Unreachable."""
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        url = self._base.with_path(path, encoded=False)
        try:
            async with self._session.request(
                method,
                url,
                headers=dict(headers),
                timeout=self._timeout,
                allow_redirects=False,
                proxy=None,
            ) as response:
                body = await _read_bounded(response)
                if body is None:
                    raise ImdsResponseError(
                        self.endpoint, path, f"answer larger than {MAX_RESPONSE_BYTES} bytes"
                    )
                log.debug("IMDS %s %s -> %d", method, path, response.status)
                return _Answer(response.status, body, dict(response.headers))
        except TimeoutError as exc:  # aiohttp's timeouts subclass it
            log.debug("IMDS %s %s timed out", method, path)
            raise _Timeout(f"timed out after {self._timeout_s:g} s") from exc
        except aiohttp.ClientError as exc:
            log.debug("IMDS %s %s failed: %s", method, path, type(exc).__name__)
            raise _Unreachable(_describe(exc)) from exc
        except OSError as exc:
            raise _Unreachable(_describe(exc)) from exc


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes | None:
    """The body, or None if it exceeds MAX_RESPONSE_BYTES."""
    if response.content_length is not None and response.content_length > MAX_RESPONSE_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(exc: BaseException) -> str:
    """A connection failure in a few words (no headers, hence no token)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _full_path(path: str) -> str:
    """``meta-data/x`` → ``/latest/meta-data/x``; absolute paths are kept."""
    return path if path.startswith("/") else "/latest/" + path
