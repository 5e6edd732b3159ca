"""The fuzz targets (fuzz/targets.py) in CI: a bounded atheris run of each, and every saved input replayed.

``make fuzz`` runs the same targets for longer (FUZZ_SECONDS, 10 minutes each by default). Without
atheris (it has wheels for CPython on Linux x86-64 only), the same targets run under hypothesis.
A crash fails the test with the input's bytes; save them in fuzz/regressions/TARGET/ (they are then
replayed here forever) and add a named regression test to tests/hostile/test_regressions.py.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest
from fuzz import targets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = pathlib.Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"
HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
SECONDS = int(os.environ.get("DBGUARD_CI_FUZZ_SECONDS", "7"))  # per target; both targets run at once
NAMES = sorted(targets.TARGETS)


def _saved(target: str) -> list[pathlib.Path]:
    return sorted(p for d in ("corpus", "regressions") for p in (FUZZ / d / target).glob("*") if p.is_file())


@pytest.fixture(scope="module")
def atheris_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, pathlib.Path]]:
    """Both fuzzers at once, each for SECONDS: {target: (exit code, output, artifact directory)}."""
    procs = {}
    for name in NAMES:
        work = tmp_path_factory.mktemp(f"fuzz-{name}")
        (work / "corpus").mkdir()
        args = [sys.executable, "-m", "fuzz", name, f"-max_total_time={SECONDS}", "-timeout=10",
                "-rss_limit_mb=2048", "-print_final_stats=1", f"-artifact_prefix={work}/",
                f"-dict={FUZZ / f'{name}.dict'}", str(work / "corpus"),
                *(str(d) for d in (FUZZ / "corpus" / name, FUZZ / "regressions" / name) if d.is_dir())]
        procs[name] = (subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), work)
    results = {}
    for name, (proc, work) in procs.items():
        try:
            out, _ = proc.communicate(timeout=SECONDS + 90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        results[name] = (proc.returncode, out.decode(errors="replace"), work)
    return results


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris has wheels for Linux x86-64 only (where CI runs); elsewhere test_target_under_hypothesis fuzzes alone")
@pytest.mark.parametrize("name", NAMES)
def test_fuzzer_finds_no_crash_in_a_bounded_run(atheris_runs, name: str, record_property):
    code, out, work = atheris_runs[name]
    runs = re.search(r"stat::number_of_executed_units: (\d+)", out)
    record_property(f"fuzz_{name}_execs", runs.group(1) if runs else "?")
    print(f"fuzz {name}: {runs.group(1) if runs else '?'} executions in {SECONDS}s")
    crashes = sorted(work.glob("crash-*")) + sorted(work.glob("timeout-*")) + sorted(work.glob("oom-*"))
    if code != 0 or crashes:
        report = "\n".join(f"{p.name}: {base64.b64encode(p.read_bytes()).decode()}  {p.read_bytes()[:300]!r}"
                           for p in crashes)
        pytest.fail(f"fuzzer {name} exited with {code}; inputs (base64):\n{report}\n\n"
                    f"save one as fuzz/regressions/{name}/<what-it-breaks> and replay it with "
                    f"`python -m fuzz {name} FILE`\n---- output (tail) ----\n{out[-6000:]}")
    assert runs and int(runs.group(1)) > 1000, out[-3000:]


@pytest.mark.parametrize("name", NAMES)
def test_target_under_hypothesis(name: str):
    seeds = [p.read_bytes() for p in _saved(name)]

    @settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.one_of(st.binary(max_size=2048),
                     st.tuples(st.sampled_from(seeds), st.integers(0, 4096), st.binary(max_size=64)).map(
                         lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :])))
    def run(data: bytes) -> None:
        targets.TARGETS[name](data)

    run()


@pytest.mark.parametrize("name", NAMES)
def test_every_saved_input_replays_cleanly(name: str):
    """The seed corpus and every input that once crashed (fuzz/regressions/) pass the target's checks."""
    failed = []
    for path in _saved(name):
        try:
            targets.TARGETS[name](path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - collect them all, then fail naming each
            failed.append(f"{path.relative_to(ROOT)}: {type(exc).__name__}: {str(exc)[:300]}")
    assert not failed, "\n".join(failed)
    assert len(_saved(name)) > 10
