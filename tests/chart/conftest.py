"""Helm for the chart tests: the real helm 4 binary (built by scripts/build-test-tools.sh), and a
``render`` helper that runs ``helm template`` and returns the parsed manifests."""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess

import pytest
import yaml

from tests.fix_kube import tools_bin

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
CHART = ROOT / "charts" / "dbguard"
RELEASE = "dbguard"
NAMESPACE = "dbguard-system"


def helm_bin() -> pathlib.Path:
    binary = tools_bin() / "helm"
    if not binary.exists():
        # Never skipped: build it like the other tools (cached by a version stamp).
        subprocess.run(["bash", str(ROOT / "scripts" / "build-test-tools.sh"), "helm"], check=True)
    return binary


@dataclasses.dataclass
class Manifests:
    """The documents ``helm template`` rendered, looked up by kind and name."""

    docs: list[dict]

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None, namespace: str | None = None) -> dict:
        found = [d for d in self.all(kind) if (name is None or d["metadata"]["name"] == name)
                 and (namespace is None or d["metadata"].get("namespace") == namespace)]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
        return found[0]

    def names(self, kind: str) -> set[str]:
        return {d["metadata"]["name"] for d in self.all(kind)}


class Helm:
    def __init__(self, binary: pathlib.Path) -> None:
        self.binary = binary

    def run(self, *args: str, env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(self.binary), *args], capture_output=True, text=True, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        return proc

    def template(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args, check=check)

    def render(self, *args: str) -> Manifests:
        text = self.template(*args).stdout
        return Manifests([d for d in yaml.safe_load_all(text) if d])


def sets(**values: str) -> list[str]:
    """--set a.b=c arguments from keyword arguments (a__b="c")."""
    out: list[str] = []
    for key, value in values.items():
        out += ["--set", f"{key.replace('__', '.')}={value}"]
    return out


@pytest.fixture(scope="session")
def helm() -> Helm:
    return Helm(helm_bin())
