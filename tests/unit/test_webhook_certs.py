"""The operator's webhook certificates: made once, kept while good, renewed before they expire
under the same CA (so the caBundle the API server trusts does not change)."""

from __future__ import annotations

import datetime
import ssl

from cryptography import x509

from dbguard.controller import certs

NAMES = ["dbguard-webhook.dbguard-system.svc", "127.0.0.1"]


def test_kept_while_good_and_renewed_under_the_same_ca() -> None:
    now = datetime.datetime.now(datetime.UTC)
    first = certs.ensure(None, NAMES, now)
    assert certs.ensure(first, NAMES, now + datetime.timedelta(days=300)) is first
    renewed = certs.ensure(first, NAMES, now + datetime.timedelta(days=340))  # < 30 days left
    assert renewed.cert != first.cert and renewed.ca_cert == first.ca_cert
    assert renewed.leaf_expires() > first.leaf_expires()
    leaf = x509.load_pem_x509_certificate(renewed.cert)
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(first.ca_cert))


def test_a_new_name_gets_a_new_certificate_and_the_secret_round_trips() -> None:
    now = datetime.datetime.now(datetime.UTC)
    first = certs.ensure(None, NAMES, now)
    wider = certs.ensure(first, [*NAMES, "localhost"], now)
    assert "localhost" in wider.leaf_names() and wider.ca_cert == first.ca_cert
    assert certs.WebhookTLS.from_secret_data(wider.to_secret_data()) == wider


def test_the_pair_loads_into_a_tls_server_context(tmp_path) -> None:
    tls = certs.ensure(None, NAMES)
    (tmp_path / "c.pem").write_bytes(tls.cert)
    (tmp_path / "k.pem").write_bytes(tls.key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")  # raises if they do not match
