"""Assemble a Proxy from settings: identity, policy engine and decider, event sink."""

from __future__ import annotations

from dbguard.audit.events import EventSink
from dbguard.config import ProxySettings
from dbguard.identity.static import StaticTokens
from dbguard.session.server import Proxy


def build_decider(settings: ProxySettings):  # noqa: ANN201 - the policy package's Decider
    from dbguard.policy import compile as policy_compile
    from dbguard.policy import decider, spec

    policies = spec.load_policies(list(settings.policy_files))
    bundle = policy_compile.compile_policies(policies)
    if settings.engine == "opa":
        from dbguard.policy import opa_server

        engine = opa_server.OpaServerEngine(bundle, settings.opa_url)
    else:
        from dbguard.policy import embedded

        engine = embedded.EmbeddedEngine(bundle)
    return decider.Decider(bundle, engine, timeout_s=settings.limits.policy_timeout)


def build_proxy(settings: ProxySettings) -> Proxy:
    tokens = StaticTokens.load(settings.identity.tokens_file) if settings.identity.mode == "token" else None
    return Proxy(settings, decider=build_decider(settings), events=EventSink.open(settings.events), tokens=tokens)
