"""The bridge's own certificate authority, built on `cryptography`.

Thing certificates carry the thing id twice: as subject CN (what brokers such as mosquitto's
`use_identity_as_username` key on) and as a URI SAN `urn:thing:<id>` (what SAN-keyed brokers
use), so a fleet can move without re-issuing."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class CsrError(ValueError):
    pass


def generate_key(kind: str = "RSA") -> PrivateKey:
    if kind == "EC":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key: PrivateKey) -> str:
    """PKCS#1 (`BEGIN RSA PRIVATE KEY`) for RSA, SEC1 (`BEGIN EC PRIVATE KEY`) for EC: the formats the
    things-gateway document shows and that mosquitto_pub/OpenSSL read directly."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


def public_pem(key: PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def cert_id(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the DER certificate (the document's `certificateId`)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def der_cert_id(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def subject_serial(pem: str) -> str | None:
    """The serialNumber attribute of a certificate's subject: the certificate's own serial number in
    hex for client certificates issued since it was added (an MQTT engine that reports only the
    subject can tell this certificate from an older one of the same thing); None before."""
    cert = x509.load_pem_x509_certificate(pem.encode())
    found = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    return str(found[0].value) if found else None


def peer_common_name(peercert: dict | None) -> str | None:
    """Subject CN from `SSLObject.getpeercert()` (a dict only for a certificate that verified)."""
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def key_type_of(key: PublicKey) -> str:
    return "EC" if isinstance(key, ec.EllipticCurvePublicKey) else "RSA"


def public_key_from_csr(pem: str) -> PublicKey:
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as exc:
        raise CsrError("csr is not a PEM certificate signing request") from exc
    if not csr.is_signature_valid:
        raise CsrError("csr signature does not verify")
    key = csr.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise CsrError("csr RSA key must be at least 2048 bits")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise CsrError("csr EC key must use P-256 or P-384")
    else:
        raise CsrError("csr key must be RSA or EC")
    return key


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class CertificateAuthority:
    dir: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def server_cert_path(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key_path(self) -> Path:
        return self.dir / "server.key"

    @property
    def ca_pem(self) -> str:
        return cert_pem(self.cert)

    @classmethod
    def load_or_create(cls, directory: Path) -> CertificateAuthority:
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / "ca.pem", directory / "ca.key"
        if cert_path.exists() and key_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return cls(directory, key, x509.load_pem_x509_certificate(cert_path.read_bytes()))
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "thingbridge CA")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650 * 2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, key, cert)

    def _sign(
        self,
        subject_cn: str,
        public_key: PublicKey,
        days: int,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        *,
        serial_in_subject: bool = False,
    ) -> x509.Certificate:
        now = _now()
        serial = x509.random_serial_number()
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]
        if serial_in_subject:
            subject.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, f"{serial:x}"))
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue_client(self, identity: str, public_key: PublicKey, days: int) -> x509.Certificate:
        """A client certificate whose CN is `identity` (a thing id, or `app:<name>`), with its own
        serial number in the subject too (see subject_serial)."""
        uri = f"urn:thing:{identity}" if not identity.startswith("app:") else f"urn:{identity}"
        return self._sign(
            identity,
            public_key,
            days,
            [x509.UniformResourceIdentifier(uri)],
            ExtendedKeyUsageOID.CLIENT_AUTH,
            serial_in_subject=True,
        )

    def ensure_server_cert(self, names: list[str]) -> None:
        """(Re)issue the listeners' certificate when missing or when the configured names changed."""
        wanted = ["localhost", "127.0.0.1", *[n for n in names if n not in ("localhost", "127.0.0.1")]]
        if self.server_cert_path.exists() and self.server_key_path.exists():
            cert = x509.load_pem_x509_certificate(self.server_cert_path.read_bytes())
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                have = [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
                    str(v) for v in san.get_values_for_type(x509.IPAddress)
                ]
            except x509.ExtensionNotFound:
                have = []
            if sorted(have) == sorted(wanted) and cert.not_valid_after_utc > _now() + dt.timedelta(days=30):
                return
        sans: list[x509.GeneralName] = []
        for name in wanted:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(wanted[0], key.public_key(), 825, sans, ExtendedKeyUsageOID.SERVER_AUTH)
        _write_private(self.server_key_path, private_pem(key).encode())
        self.server_cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
