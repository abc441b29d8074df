"""Schema-driven fuzzing: schemathesis generates requests for every operation in the
OpenAPI schema and sends them, with an admin token, to a real uvicorn server (on
SQLite and on PostgreSQL); no response may be a server error (5xx).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.server_fixtures import ADMIN_TOKEN

if TYPE_CHECKING:
    from tests.server_fixtures import LiveServer


EXAMPLES_PER_OPERATION = 8


def test_no_server_errors(module_server: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(f"{module_server.url}/openapi.json")
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    failures: list[str] = []
    operations = 0
    calls = [0]

    def fuzz(op: Any) -> None:
        @given(case=op.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            response = case.call(base_url=module_server.url, headers=headers)
            calls[0] += 1
            if response.status_code >= 500:
                failures.append(
                    f"{op.method.upper()} {op.path}: {response.status_code} "
                    f"{response.text[:200]} <- {case.as_curl_command()}"
                )

        run()

    for result in schema.get_all_operations():
        operations += 1
        fuzz(result.ok())
    assert operations > 30
    assert calls[0] > operations * 3
    assert not failures, "\n".join(failures[:20])
