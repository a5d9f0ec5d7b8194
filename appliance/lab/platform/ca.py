"""The reference platform's own certificate authority (lab only).

At ``init`` the platform creates a CA (EC P-256), a server certificate whose
subject alternative names are the host names and addresses the lab reaches it
by, and later signs the appliances' CSRs into client certificates. Keys are
written with mode 0600 into the platform's data directory, never elsewhere.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.lab.platform.errors import LabPlatformError

CA_VALIDITY_DAYS = 3650
SERVER_CERT_VALIDITY_DAYS = 825
CLIENT_CERT_VALIDITY_DAYS = 365
# Certificates are back-dated a little so that a lab clock a few minutes
# behind the platform's does not reject a fresh certificate.
BACKDATE_S = 300
DEFAULT_SERVER_NAMES = ("127.0.0.1", "::1", "localhost", "platform.lab")


class CsrError(LabPlatformError):
    """A certificate signing request the platform refuses to sign."""


@dataclass(frozen=True)
class IssuedCertificate:
    """A client certificate the platform issued, with the facts it keys on."""

    pem: str
    serial: int
    fingerprint_sha256: str
    public_key_pem: str


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (keys, secrets)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint of a certificate's DER encoding, lower-case hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def der_fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint of DER bytes, as :func:`fingerprint` computes it."""
    return hashlib.sha256(der).hexdigest()


class CertificateAuthority:
    """The CA files of one data directory: ``ca.pem``/``ca.key`` and ``server.pem``/``server.key``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca_file = directory / "ca.pem"
        self.ca_key_file = directory / "ca.key"
        self.server_cert_file = directory / "server.pem"
        self.server_key_file = directory / "server.key"

    def exists(self) -> bool:
        """Whether the CA and server certificate were created already."""
        return all(
            p.exists()
            for p in (self.ca_file, self.ca_key_file, self.server_cert_file, self.server_key_file)
        )

    def create(self, server_names: Iterable[str] = DEFAULT_SERVER_NAMES) -> None:
        """Create the CA and a server certificate for ``server_names`` (host names or IPs)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        now = _now()
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "VSA lab platform CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(seconds=BACKDATE_S))
            .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_private(self.ca_key_file, _key_pem(ca_key))
        self.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        self._issue_server(ca_key, ca_cert, list(server_names))

    def _issue_server(
        self, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: list[str]
    ) -> None:
        if not names:
            raise LabPlatformError("the server certificate needs at least one host name or address")
        now = _now()
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(seconds=BACKDATE_S))
            .not_valid_after(now + dt.timedelta(days=SERVER_CERT_VALIDITY_DAYS))
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        write_private(self.server_key_file, _key_pem(key))
        self.server_cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def reissue_server(self, server_names: Iterable[str]) -> None:
        """Replace the server certificate (new names) under the existing CA."""
        self._issue_server(self._ca_key(), self.ca_certificate(), list(server_names))

    def issue_keypair(
        self, common_name: str, *, server_names: Iterable[str] = (), client: bool = False
    ) -> tuple[str, bytes]:
        """A fresh P-256 key and a certificate for it under this CA: ``(cert_pem, key_pem)``.

        With ``server_names`` it is a server certificate for those names (e.g. the
        lab's MQTT broker); with ``client`` a client certificate (e.g. the
        platform's own MQTT connection).
        """
        names = list(server_names)
        ca_key = self._ca_key()
        now = _now()
        key = ec.generate_private_key(ec.SECP256R1())
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if names else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        if not usages:
            raise LabPlatformError("a certificate needs server names, client use, or both")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.ca_certificate().subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(seconds=BACKDATE_S))
            .not_valid_after(now + dt.timedelta(days=SERVER_CERT_VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if names:
            builder = builder.add_extension(_san(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM).decode("ascii"), _key_pem(key)

    def ca_pem(self) -> str:
        """The CA certificate, PEM."""
        return self.ca_file.read_text()

    def ca_certificate(self) -> x509.Certificate:
        """The CA certificate."""
        return x509.load_pem_x509_certificate(self.ca_file.read_bytes())

    def _ca_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.ca_key_file.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def sign_csr(self, csr_pem: str, common_name: str) -> IssuedCertificate:
        """Check a PKCS#10 CSR (valid signature, EC P-256 key) and issue a client certificate.

        The subject is the platform's choice (``CN=<appliance_id>``): the CSR's
        own subject and extensions are ignored, as a CA should.
        """
        csr = load_csr(csr_pem)
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        ca_cert = self.ca_certificate()
        ca_key = self._ca_key()
        now = _now()
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(seconds=BACKDATE_S))
            .not_valid_after(now + dt.timedelta(days=CLIENT_CERT_VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=True, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        return IssuedCertificate(
            pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            serial=serial,
            fingerprint_sha256=fingerprint(cert),
            public_key_pem=public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode("ascii"),
        )

    def server_ssl_context(self) -> ssl.SSLContext:
        """The listener's TLS context: TLS 1.2+, client certificates optional but verified.

        ``CERT_OPTIONAL`` lets ``/register`` work without a client certificate;
        a certificate that is presented must chain to this CA, and every other
        endpoint refuses a request without one (in the application layer).
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.server_cert_file, self.server_key_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=str(self.ca_file))
        return ctx


def load_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """Parse and check a CSR: one PEM PKCS#10 request, valid self-signature, EC P-256 key."""
    if csr_pem.count("-----BEGIN CERTIFICATE REQUEST-----") != 1:
        raise CsrError("csr_pem must hold exactly one PEM certificate request")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("utf-8"))
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, UnicodeError, TypeError) as exc:
        raise CsrError("csr_pem is not a well-formed PEM PKCS#10 certificate request") from exc
    if not valid:
        raise CsrError("csr_pem carries an invalid self-signature")
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise CsrError("csr_pem must hold an EC P-256 (secp256r1) public key")
    return csr


def generate_client_key_and_csr(common_name: str = "vsa-appliance") -> tuple[bytes, str]:
    """A fresh P-256 key (PEM, PKCS#8) and a CSR for it: what an appliance sends (tests, demo)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM).decode("ascii")
