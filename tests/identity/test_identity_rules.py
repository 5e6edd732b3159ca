"""Pure identity rules: login names, JWT expiry, the identity flags of `dbguard proxy`."""

from __future__ import annotations

import base64
import json

import pytest

from dbguard import cli
from dbguard.config import IdentitySettings, OidcSettings
from dbguard.errors import ConfigError
from dbguard.identity import authenticator
from dbguard.identity.principal import Principal
from dbguard.identity.static import StaticTokens
from dbguard.session.cli import settings_from_args

SA = Principal(user="system:serviceaccount:shop:reports", source="tokenreview")


@pytest.mark.parametrize("requested, principal, ok", [
    ("system:serviceaccount:shop:reports", SA, True),
    ("shop:reports", SA, True),  # the short NS:SA form
    ("", SA, True),  # no user name: the token alone decides
    ("reports", SA, False),  # ambiguous across namespaces
    ("shop:other", SA, False),
    ("system:serviceaccount:shop:other", SA, False),
    ("alice", Principal(user="alice"), True),
    ("alice", Principal(user="oidc:alice"), False),  # a prefixed OIDC name is logged in with in full
    ("Alice", Principal(user="alice"), False),
])
def test_login_name_must_fit_the_authenticated_principal(requested, principal, ok):
    assert authenticator.login_matches(requested, principal) is ok


def _jwt(claims: object) -> str:
    enc = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{enc}.c2ln"


@pytest.mark.parametrize("token, exp", [
    (_jwt({"exp": 1700000000}), 1700000000.0),
    (_jwt({"sub": "x"}), None),
    (_jwt({"exp": "soon"}), None),
    (_jwt({"exp": True}), None),
    (_jwt([1, 2]), None),
    ("a.b", None),
    ("a.!!!.c", None),
    ("static-token", None),
])
def test_expiry_reads_exp_from_jwts_only(token, exp):
    assert authenticator.expiry(token) == exp


async def test_static_tokens_serve_as_an_authenticator(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("tokens:\n- {user: alice, groups: [dev], token: alice-token-1}\n")
    tokens = StaticTokens.load(f)
    assert (await tokens.authenticate("alice-token-1")).user == "alice"
    with pytest.raises(authenticator.Rejected, match="not in the token file"):
        await tokens.authenticate("bob-token-000")


# --- the flags -------------------------------------------------------------------------------------------


def identity_of(*flags: str) -> IdentitySettings:
    args = cli.build_parser().parse_args(["proxy", "--upstream", "postgresql://app@127.0.0.1/app",
                                          "--policy", "p.yaml", *flags])
    return settings_from_args(args).identity


def test_each_mode_reads_its_own_flags():
    assert identity_of("--tokens", "t.yaml").mode == "token"
    s = identity_of("--auth", "tokenreview")
    assert (s.mode, s.token_audience, s.kubeconfig) == ("tokenreview", "dbguard", "")
    s = identity_of("--auth", "tokenreview", "--token-audience", "pg", "--kubeconfig", "kc")
    assert (s.token_audience, s.kubeconfig) == ("pg", "kc")
    s = identity_of("--workload-token-file", "/var/run/secrets/dbguard/token")
    assert (s.mode, s.workload_token_file) == ("workload-token", "/var/run/secrets/dbguard/token")
    s = identity_of("--workload-identity", "system:serviceaccount:a:b", "--workload-group", "g")
    assert (s.mode, s.workload_user, s.workload_groups) == ("workload", "system:serviceaccount:a:b", ("g",))
    s = identity_of("--auth", "oidc", "--oidc-issuer", "https://idp", "--oidc-audience", "db",
                    "--oidc-username-claim", "email", "--oidc-username-prefix", "oidc:")
    assert s.oidc == OidcSettings(issuer="https://idp", audience="db", username_claim="email",
                                  username_prefix="oidc:")


@pytest.mark.parametrize("flags, error", [
    (("--tokens", "t.yaml", "--oidc-issuer", "https://idp"), "--oidc-issuer needs --auth oidc"),
    (("--auth", "tokenreview", "--oidc-audience", "x"), "--oidc-audience needs --auth oidc"),
    (("--auth", "oidc", "--oidc-issuer", "https://idp"), "needs --oidc-issuer URL and --oidc-audience"),
    (("--tokens", "t.yaml", "--kubeconfig", "kc"), "--kubeconfig needs --auth tokenreview"),
    (("--auth", "oidc", "--oidc-issuer", "https://i", "--oidc-audience", "a", "--token-audience", "x"),
     "--token-audience needs"),
    (("--workload-token-file", "f", "--workload-group", "g"), "--workload-group goes with --workload-identity"),
])
def test_flags_of_another_mode_are_config_errors(flags, error):
    with pytest.raises(ConfigError, match=error):
        identity_of(*flags)


@pytest.mark.parametrize("flags", [
    (),
    ("--tokens", "t.yaml", "--auth", "oidc"),
    ("--auth", "tokenreview", "--workload-token-file", "f"),
    ("--workload-identity", "u", "--workload-token-file", "f"),
])
def test_exactly_one_identity_mode(flags, capsys):
    with pytest.raises(SystemExit):
        identity_of(*flags)
    assert "--tokens" in capsys.readouterr().err
