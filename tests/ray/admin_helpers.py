"""Helpers of the admin API's tests: a uvicorn server in a thread, a Prometheus scrape, and
schemathesis fuzzing of the published spec against a live server."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import requests

from api.admin import serve_in_thread
from api.metrics import parse_metrics


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on an ephemeral loopback port; its base URL."""
    server, url = serve_in_thread(app)
    try:
        yield url
    finally:
        server.should_exit = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(api: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Samples by name, then by their sorted labels."""
    response = requests.get(api + "/metrics", timeout=60)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse_metrics(response.text)


def fuzz(api: str, headers: dict[str, str], max_examples: int) -> dict[str, set[int]]:
    """Every operation of the spec served at ``api``, in both generation modes; returns the
    status codes seen per operation. A failed check (a 5xx, an undocumented status, a body or content type
    that the spec does not allow) fails the test with schemathesis' report."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    schema = schemathesis.openapi.from_url(api + "/openapi.json")
    seen: dict[str, set[int]] = {}
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(
                max_examples=max_examples,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                response = case.call_and_validate(
                    base_url=api, session=session, headers=headers, checks=checks, timeout=60
                )
                key = f"{case.operation.method.upper()} {case.operation.path}"
                seen.setdefault(key, set()).add(response.status_code)

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid: an operation without parameters
                assert mode is schemathesis.GenerationMode.NEGATIVE, operation.path
    return seen
