"""The promised defaults, pinned (kopf's test_defaults): changing one is a visible decision."""

from __future__ import annotations

import pytest

from dbguard.config import ProxySettings, UpstreamSettings
from dbguard.errors import ConfigError


def test_proxy_defaults_are_safe_and_documented():
    s = ProxySettings()
    assert (s.listen.host, s.listen.port, s.listen.require_tls) == ("127.0.0.1", 6432, False)
    assert s.limits.policy_timeout == 0.2
    assert s.limits.login_timeout == 10.0
    assert s.limits.max_message_size == 64 * 1024 * 1024
    assert s.limits.max_connections == 2000 and s.limits.max_connections_per_identity == 0
    assert s.engine == "embedded"
    assert s.identity.mode == "token"
    assert s.upstream.sslmode == "prefer"


def test_upstream_url_parsing_keeps_the_password_out_of_repr_and_redacted_url():
    u = UpstreamSettings.from_url("postgresql://app:s3cret%21@db.example:6543/shop?sslmode=require")
    assert (u.user, u.password, u.host, u.port, u.database, u.sslmode) == (
        "app", "s3cret!", "db.example", 6543, "shop", "require")
    assert "s3cret" not in repr(u) and "s3cret" not in u.redacted_url()
    assert UpstreamSettings.from_url("postgresql://app:x@h/db", password="other").password == "other"


@pytest.mark.parametrize("url, error", [
    ("mysql://x@y/z", "postgresql:// URL"),
    ("postgresql://x@y/z?sslmode=bogus", "unknown sslmode"),
    ("postgresql://x@y/z?options=-c%20x", "unsupported URL parameter"),
])
def test_bad_upstream_urls_are_config_errors(url, error):
    with pytest.raises(ConfigError, match=error):
        UpstreamSettings.from_url(url)


def test_identity_defaults_are_pinned():
    i = ProxySettings().identity
    assert (i.token_audience, i.kubeconfig, i.workload_token_file) == ("dbguard", "", "")
    assert (i.review_timeout, i.review_cache_ttl, i.review_cache_size) == (5.0, 60.0, 10_000)
    o = i.oidc
    assert (o.username_claim, o.groups_claim, o.username_prefix) == ("sub", "groups", "")
    assert (o.leeway, o.fetch_timeout, o.jwks_min_refresh, o.jwks_max_age) == (30.0, 5.0, 10.0, 3600.0)
