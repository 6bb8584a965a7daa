"""A bounded schemathesis run against the served OpenAPI schema: no request gets a 5xx answer, and every
status code a route answers is one its schema documents."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, status_code_conformance
from server_helpers import BackendProcess


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    process = BackendProcess(tmp_path_factory.mktemp("schema") / "store")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def api_schema(served):
    return schemathesis.openapi.from_url(served.client.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance])
