"""Fixtures shared by the integration suites."""

from __future__ import annotations

import pytest

from tests.integration.tls_support import Pki, make_pki, openssl_available


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA of this test session, with server and client certificates (see ``tls_support``)."""
    if not openssl_available():
        pytest.skip("the openssl command is not on PATH")
    return make_pki(tmp_path_factory.mktemp("pki"))
