"""Shared pytest configuration for the whole test tree.

* Registers the ``e2e`` marker (real relay and agent processes on loopback;
  deselect with ``-m "not e2e"``).
* Keeps each phase's report on the item (``item.rep_setup``, ``item.rep_call``,
  ``item.rep_teardown``) so fixtures can tell in their finalizers whether the
  test failed.
* When a test fails and its item carries an ``e2e_log_tail`` callable (set by
  the e2e fixtures), the tail of every process log is attached to the failure
  report as an extra section, so a red run shows what the relay and agents said.
* ``dev_pki``: the one dev PKI of the session (:mod:`devpki`); every layer that needs
  certificates adapts this one instead of making its own.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import pytest
from devpki import DevPki, make_dev_pki


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "e2e: end-to-end test; starts real outrelay-relay/outrelay-agent processes on 127.0.0.1",
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    tail: Callable[[], str] | None = getattr(item, "e2e_log_tail", None)
    if report.failed and tail is not None:
        try:
            text = tail()
        except Exception as exc:  # never let log collection hide the real failure
            text = f"(could not collect process logs: {exc!r})"
        if text:
            report.sections.append((f"e2e process logs ({report.when})", text))
    return report


@pytest.fixture(scope="session")
def dev_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """``outrelay pki dev`` once per session: CA, relay, two agents, more on demand."""
    return make_dev_pki(tmp_path_factory.mktemp("dev-pki") / "pki")


# The real etcd cluster fixtures of the mesh tests (tests/etcd_cluster.py).
from etcd_cluster import etcd3, etcd_cluster  # noqa: E402

__all__ = ["dev_pki", "etcd3", "etcd_cluster"]
