"""The Dockerfile, read instruction by instruction (no container engine here; e2e/run.sh builds it):
pinned bases, a numeric non-root user, the dbguard entrypoint, a read-only-root friendly HOME, OCI
labels, a build context that holds what it copies, and `pip install .` yielding every module the
package imports."""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import importlib.metadata
import json
import pathlib
import re
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclasses.dataclass
class Instruction:
    keyword: str
    value: str


def parse(text: str) -> list[Instruction]:
    """Dockerfile instructions: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, value = line.partition(" ")
        out.append(Instruction(keyword.upper(), value.strip()))
    assert not pending, "the Dockerfile ends inside a continuation"
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    out: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            out.append([])
        if not out:
            assert ins.keyword == "ARG", f"{ins.keyword} before the first FROM (only ARG may be)"
            continue
        out[-1].append(ins)
    return out


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    args = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            name, _, default = ins.value.partition("=")
            args[name] = default
    return args


def key_values(value: str) -> dict[str, str]:
    """KEY=VALUE pairs of LABEL / ENV (quoted values allowed)."""
    return {m[0]: m[1].strip('"') for m in re.findall(r'([\w.\-]+)=("[^"]*"|\S+)', value)}


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def final(dockerfile: list[Instruction]) -> list[Instruction]:
    return stages(dockerfile)[-1]


def test_base_images_are_pinned_python_311_slim_bookworm(dockerfile: list[Instruction]) -> None:
    args = global_args(dockerfile)
    bases = []
    for stage in stages(dockerfile):
        image = stage[0].value.split()[0]
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], image)
        bases.append(image)
    assert len(bases) >= 2, "multi-stage: a build stage and a runtime stage"
    for image in bases:
        name, _, tag = image.rpartition("/")[2].partition(":")
        assert tag and tag != "latest", f"{image}: give the base image a tag, never latest"
    assert bases[-1] == "python:3.11-slim-bookworm"
    requires = PYPROJECT["project"]["requires-python"]
    assert requires == ">=3.11", "the image's Python must satisfy requires-python"


def test_runtime_stage_runs_dbguard_as_numeric_user_65532(final: list[Instruction]) -> None:
    users = [i.value for i in final if i.keyword == "USER"]
    assert users, "the runtime stage sets USER"
    assert re.fullmatch(r"65532(:65532)?", users[-1]), f"USER {users[-1]}: numeric, so runAsNonRoot can check it"
    entry = [i.value for i in final if i.keyword == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["dbguard"], "exec-form ENTRYPOINT [\"dbguard\"]"
    assert PYPROJECT["project"]["scripts"]["dbguard"] == "dbguard.cli:main"


def test_runtime_writes_nothing_outside_tmp(final: list[Instruction]) -> None:
    env: dict[str, str] = {}
    for i in final:
        if i.keyword == "ENV":
            env.update(key_values(i.value))
    assert env["HOME"] == "/tmp"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert [i.value for i in final if i.keyword == "WORKDIR"][-1] == "/tmp"
    # The venv comes from the build stage, compiled there.
    assert any(i.keyword == "COPY" and i.value.startswith("--from=build ") for i in final)
    assert not any(i.keyword == "RUN" and "pip" in i.value for i in final), "no pip in the runtime stage"


def test_build_stage_installs_the_package_with_pip(dockerfile: list[Instruction]) -> None:
    build = stages(dockerfile)[0]
    assert build[0].value.split()[-2:] == ["AS", "build"]
    runs = " ".join(i.value for i in build if i.keyword == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), "pip install . (the project, as users install it)"
    # The image build fails when either command's modules cannot be imported.
    assert "dbguard.controller.handlers" in runs and "dbguard.session.cli" in runs


def test_image_carries_oci_labels(final: list[Instruction]) -> None:
    labels: dict[str, str] = {}
    for i in final:
        if i.keyword == "LABEL":
            labels.update(key_values(i.value))
    for key in ("title", "description", "version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{key}" in labels, key
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, enough for our file: last match wins, ! re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/") or \
                fnmatch.fnmatch(path, pattern.replace("**/", "*/")) or fnmatch.fnmatch(path, pattern.replace("**/", "")):
            ignored = not negate
    return ignored


def test_build_context_holds_what_the_dockerfile_copies(dockerfile: list[Instruction]) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copies = [i.value.split() for i in dockerfile if i.keyword == "COPY" and not i.value.startswith("--from")]
    sources = [s for parts in copies for s in parts[:-1]]
    assert set(sources) == {"pyproject.toml", "README.md", "operator"}
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"
    for path in ("operator/dbguard/cli.py", "operator/dbguard/policy/dbguard.rego"):
        assert not _ignored(path, patterns), path
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "operator/dbguard/__pycache__/cli.pyc"):
        assert _ignored(path, patterns), f"{path} should stay out of the build context"
    # The Rego library ships inside the package (package data), or the proxy cannot decide.
    assert "policy/*.rego" in PYPROJECT["tool"]["setuptools"]["package-data"]["dbguard"]


def _third_party_imports() -> set[str]:
    modules: set[str] = set()
    for path in (ROOT / "operator" / "dbguard").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "dbguard"}


def _installed_by_pip_install_dot() -> set[str]:
    """Normalised distribution names `pip install .` brings: the dependencies and theirs."""
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    todo = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = norm(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(sub)
    return seen


def test_pip_install_dot_brings_every_module_the_package_imports() -> None:
    """The image is `pip install .`: a module imported but not (transitively) declared is missing there."""
    provided = _installed_by_pip_install_dot()
    by_module = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(_third_party_imports()):
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in by_module.get(module, [module])}
        if not dists & provided:
            missing[module] = sorted(dists)
    assert not missing, f"imported by operator/dbguard but not in pyproject's dependencies: {missing}"
