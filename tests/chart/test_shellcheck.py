"""Every shell script of the repository (e2e/*.sh, scripts/*.sh) passes shellcheck at its default
severity: e2e/run.sh cannot run here (no container engine), so reading it is all the checking it gets
before a machine with docker runs it. shellcheck comes from scripts/install-system-deps.sh."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.chart.conftest import ROOT

SCRIPTS = sorted([*ROOT.glob("e2e/*.sh"), *ROOT.glob("scripts/*.sh")])


def test_there_are_scripts_to_check() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"e2e/run.sh", "scripts/install-system-deps.sh", "scripts/demo.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.relative_to(ROOT).as_posix() for p in SCRIPTS])
def test_shellcheck_is_clean(script) -> None:  # noqa: ANN001 - a pathlib.Path
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:  # never skipped: install it like the other system packages
        subprocess.run(["bash", str(ROOT / "scripts" / "install-system-deps.sh")], check=True)
        shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing (scripts/install-system-deps.sh installs it)"
    r = subprocess.run([shellcheck, "--external-sources", "--format=gcc", str(script)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
