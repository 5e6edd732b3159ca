"""Fixtures shared by the operator tests."""

from tests.operator.test_sidecar_local import sidecar  # noqa: F401 - the injected sidecar, run locally
