"""The webhook server's TLS: a CA and a serving certificate, made and rotated by the operator.

The API server calls the webhooks over TLS and checks them against the ``caBundle`` in the
webhook configurations. The CA lives ten years and stays in the bundle; the serving certificate
lives a year and is renewed (signed by the same CA, so the bundle does not change) when less than
30 days are left. The pair is kept in a Secret so that a restarted or second replica serves the
same certificate; without an operator namespace it lives in memory only (local runs, tests).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = datetime.timedelta(days=3650)
LEAF_LIFETIME = datetime.timedelta(days=365)
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclasses.dataclass(frozen=True, slots=True)
class WebhookTLS:
    ca_cert: bytes  # PEM
    ca_key: bytes
    cert: bytes
    key: bytes

    def to_secret_data(self) -> dict[str, str]:
        return {k: base64.b64encode(v).decode() for k, v in
                (("ca.crt", self.ca_cert), ("ca.key", self.ca_key), ("tls.crt", self.cert), ("tls.key", self.key))}

    @classmethod
    def from_secret_data(cls, data: dict[str, str]) -> WebhookTLS:
        raw = {k: base64.b64decode(v) for k, v in (data or {}).items()}
        return cls(ca_cert=raw["ca.crt"], ca_key=raw["ca.key"], cert=raw["tls.crt"], key=raw["tls.key"])

    def leaf_expires(self) -> datetime.datetime:
        return x509.load_pem_x509_certificate(self.cert).not_valid_after_utc

    def leaf_names(self) -> set[str]:
        cert = x509.load_pem_x509_certificate(self.cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {str(n) for n in sans.get_values_for_type(x509.DNSName)} | \
            {str(n) for n in sans.get_values_for_type(x509.IPAddress)}


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         encipher_only=False, decipher_only=False)


def new_ca(now: datetime.datetime) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dbguard-webhook-ca")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_usage(ca=True), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def issue(ca_cert_pem: bytes, ca_key_pem: bytes, names: list[str], now: datetime.datetime) -> tuple[bytes, bytes]:
    """A serving certificate for DNS names and IP addresses, signed by the CA."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + LEAF_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def ensure(current: WebhookTLS | None, names: list[str], now: datetime.datetime | None = None) -> WebhookTLS:
    """The pair to serve: the current one if still good for these names, else renewed (same CA when possible)."""
    now = now or datetime.datetime.now(datetime.UTC)
    if current is not None:
        ca = x509.load_pem_x509_certificate(current.ca_cert)
        ca_ok = ca.not_valid_after_utc - now > LEAF_LIFETIME
        if ca_ok and current.leaf_expires() - now > RENEW_BEFORE and set(names) <= current.leaf_names():
            return current
        if ca_ok:
            cert, key = issue(current.ca_cert, current.ca_key, names, now)
            return dataclasses.replace(current, cert=cert, key=key)
    ca_cert, ca_key = new_ca(now)
    cert, key = issue(ca_cert, ca_key, names, now)
    return WebhookTLS(ca_cert=ca_cert, ca_key=ca_key, cert=cert, key=key)
