import pytest

pytest_plugins = ("tests.fix_postgres", "tests.fix_proxy", "tests.fix_opa", "tests.fix_kube", "tests.fix_operator")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ANN001, ANN201 - pytest hook
    # Lets fixtures see whether the test failed, to print the server and proxy logs (PgBouncer style).
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
