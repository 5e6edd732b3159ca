"""Hot reload: a changed policy file (swapped the way the kubelet swaps a ConfigMap mount) takes
effect for open connections, a broken one leaves the running revision in force, and a masking
change closes the sessions it concerns."""

from __future__ import annotations

import os
import pathlib

import psycopg
import pytest

from tests.fix_postgres import Postgres, wait_until
from tests.fix_proxy import EXAMPLE_MASKING, EXAMPLE_POLICY, Proxy, start_proxy

DENY_DELETE_ORDERS = """
    - name: no-order-deletes
      match: {operations: [DELETE], tables: [orders]}
      action: deny
      reason: orders are never deleted
"""


class ConfigMapDir:
    """A directory laid out like a mounted ConfigMap: file -> ..data/file, ..data -> ..<version>."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.version = 0
        root.mkdir(parents=True)

    def publish(self, files: dict[str, str]) -> None:
        self.version += 1
        version_dir = self.root / f"..v{self.version}"
        version_dir.mkdir()
        for name, text in files.items():
            (version_dir / name).write_text(text)
        tmp_link = self.root / "..data_tmp"
        tmp_link.symlink_to(version_dir.name)
        os.replace(tmp_link, self.root / "..data")  # atomic, as the kubelet does
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")


def _with_rule(base: str, rule: str) -> str:
    return base.replace("  rules:\n", "  rules:\n" + rule, 1)


def _reloaded(proxy: Proxy, n: int) -> bool:
    return sum(1 for e in proxy.events() if e.get("kind") == "policy" and e.get("event") == "reloaded") >= n


@pytest.fixture
def mounted(pg: Postgres, tmp_path: pathlib.Path) -> tuple[ConfigMapDir, Proxy]:
    cm = ConfigMapDir(tmp_path / "policies")
    cm.publish({"policy.yaml": EXAMPLE_POLICY.read_text(), "masking.yaml": EXAMPLE_MASKING.read_text()})
    proxy = start_proxy(pg, tmp_path, "--policy", str(cm.root / "masking.yaml"), "--policy-reload-interval", "0.2",
                        policy=cm.root / "policy.yaml")
    yield cm, proxy
    proxy.stop()


def test_changed_policy_applies_to_open_connections(mounted: tuple[ConfigMapDir, Proxy]) -> None:
    cm, proxy = mounted
    loaded = [e for e in proxy.events() if e.get("kind") == "policy"]
    assert loaded and loaded[0]["event"] == "loaded" and loaded[0]["policies"] == ["shop-guardrails", "pii-masking"]
    with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
        conn.execute("DELETE FROM orders WHERE id = -1")  # allowed by the running revision
        cm.publish({"policy.yaml": _with_rule(EXAMPLE_POLICY.read_text(), DENY_DELETE_ORDERS),
                    "masking.yaml": EXAMPLE_MASKING.read_text()})
        wait_until(lambda: _reloaded(proxy, 1), timeout=15, what="the policy reload")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-order-deletes"):
            conn.execute("DELETE FROM orders WHERE id = -1")
        assert conn.execute("SELECT 1").fetchone() == (1,)  # same connection, still usable
    event = next(e for e in proxy.events() if e.get("event") == "reloaded")
    assert event["previous"] != event["revision"]
    decisions = [e for e in proxy.events() if e.get("kind") == "decision" and e.get("rule") == "no-order-deletes"]
    assert decisions and decisions[-1]["decisions"][0]["revision"] == event["revision"]


def test_broken_policy_keeps_the_running_revision(mounted: tuple[ConfigMapDir, Proxy]) -> None:
    cm, proxy = mounted
    with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
        cm.publish({"policy.yaml": EXAMPLE_POLICY.read_text().replace("action: deny", "action: deny-all", 1),
                    "masking.yaml": EXAMPLE_MASKING.read_text()})
        wait_until(lambda: any(e.get("event") == "reload-failed" for e in proxy.events()), timeout=15,
                   what="the failed reload to be recorded")
        failed = next(e for e in proxy.events() if e.get("event") == "reload-failed")
        assert "deny-all" in failed["error"] and "policy.yaml" in failed["error"]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-unfiltered-writes"):
            conn.execute("DELETE FROM orders")  # the old revision still decides
    assert proxy.proc.poll() is None


def test_masking_change_closes_masked_sessions_only(mounted: tuple[ConfigMapDir, Proxy]) -> None:
    cm, proxy = mounted
    masked = psycopg.connect(proxy.dsn("copilot"), autocommit=True)  # an AI agent: masked
    clear = psycopg.connect(proxy.dsn("frida"), autocommit=True)  # fraud: clear text in either revision
    try:
        changed = EXAMPLE_MASKING.read_text().replace("strategy: email", "strategy: redact", 1)
        assert changed != EXAMPLE_MASKING.read_text()
        cm.publish({"policy.yaml": EXAMPLE_POLICY.read_text(), "masking.yaml": changed})
        wait_until(lambda: _reloaded(proxy, 1), timeout=15, what="the policy reload")
        with pytest.raises(psycopg.OperationalError, match="masking policy changed"):
            masked.execute("SELECT email FROM customers LIMIT 1")
        assert clear.execute("SELECT 1").fetchone() == (1,)
    finally:
        masked.close()
        clear.close()
    with psycopg.connect(proxy.dsn("copilot"), autocommit=True) as again:
        email = again.execute("SELECT email FROM customers ORDER BY id LIMIT 1").fetchone()[0]
        assert "@" not in email  # the new revision redacts instead of keeping the domain


def test_a_masking_change_that_cannot_be_built_keeps_the_running_revision(mounted: tuple[ConfigMapDir, Proxy]) -> None:
    cm, proxy = mounted
    loaded = next(e for e in proxy.events() if e.get("kind") == "policy")["revision"]
    with psycopg.connect(proxy.dsn("copilot"), autocommit=True) as conn:
        # A hash rule needs --masking-key, which this proxy was not given: the whole revision is refused.
        hashed = EXAMPLE_MASKING.read_text() + "    - columns: [public.customers.name]\n      strategy: hash\n"
        cm.publish({"policy.yaml": EXAMPLE_POLICY.read_text(), "masking.yaml": hashed})
        wait_until(lambda: any(e.get("event") == "reload-failed" for e in proxy.events()), timeout=15,
                   what="the failed reload to be recorded")
        failed = next(e for e in proxy.events() if e.get("event") == "reload-failed")
        assert "--masking-key" in failed["error"] and failed["revision"] == loaded
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-unfiltered-writes"):
            conn.execute("DELETE FROM orders")
    assert not any(e.get("event") == "reloaded" for e in proxy.events())
