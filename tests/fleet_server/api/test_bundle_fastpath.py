"""Bundle ranges answered from the caches (fleet_server.api.bundle_fastpath) give the
route's answers: the same bytes and headers, and the same refusals.

The router's route answers with starlette's FileResponse, which adds ``last-modified``;
the fast path does not, which is how these tests tell who answered.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pytest

from fleet_server.api.bundle_fastpath import parse_single_range

if TYPE_CHECKING:
    from tests.server_fixtures import Fleet


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", (0, 100)),
        ("bytes=100-", (100, 1000)),
        ("bytes=990-5000", (990, 1000)),  # clipped to the end, as RFC 9110 says
        ("bytes=999-999", (999, 1000)),
        ("bytes=1000-", None),  # past the end: the route answers 416
        ("bytes=20-10", None),  # malformed: the route answers 400
        ("bytes=-100", None),  # suffix ranges: the route
        ("bytes=0-9,20-29", None),  # several ranges: the route (multipart)
        ("items=0-9", None),
    ],
)
def test_parse_single_range(header: str, expected: tuple[int, int] | None) -> None:
    assert parse_single_range(header, 1000) == expected


def test_cached_device_gets_ranges_without_the_router(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")
    bundle = fleet.upload_bundle()
    fleet.assign("cam-1", bundle["id"])
    url = f"/device/v1/bundles/{bundle['id']}"
    full = fleet.client.get(url, headers=dev)  # no Range: the route
    assert full.status_code == 200 and "last-modified" in full.headers
    size = len(full.content)
    assert hashlib.sha256(full.content).hexdigest() == bundle["sha256"]
    for header, (start, end) in [
        ("bytes=0-99", (0, 100)),
        ("bytes=100-", (100, size)),
        (f"bytes={size - 1}-", (size - 1, size)),
        (f"bytes=10-{size + 50}", (10, size)),
    ]:
        r = fleet.client.get(url, headers={**dev, "Range": header})
        assert r.status_code == 206, header
        assert "last-modified" not in r.headers, "answered by the route, not the fast path"
        assert r.content == full.content[start:end]
        assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
        assert r.headers["etag"] == f'"{bundle["sha256"]}"'
        assert r.headers["accept-ranges"] == "bytes"
        assert r.headers["content-type"] == "application/octet-stream"
    m = fleet.client.get("/metrics", headers=fleet.admin).text
    assert 'route="/device/v1/bundles/{bundle_id}",status="206"} 4.0' in m


def test_what_the_fast_path_does_not_serve_the_route_answers(fleet: Fleet) -> None:
    a = fleet.enroll("cam-a")
    b = fleet.enroll("cam-b")
    bundle = fleet.upload_bundle()
    fleet.assign("cam-a", bundle["id"])
    url = f"/device/v1/bundles/{bundle['id']}"
    size = fleet.client.get(url, headers=a).headers["content-length"]
    assert fleet.client.get(url, headers={**b, "Range": "bytes=0-9"}).status_code == 404
    assert fleet.client.get(url, headers={"Range": "bytes=0-9"}).status_code == 401
    wrong = {"Authorization": "Bearer efd_not-a-credential", "Range": "bytes=0-9"}
    assert fleet.client.get(url, headers=wrong).status_code == 401
    assert fleet.client.get(url, headers={**a, "Range": f"bytes={size}-"}).status_code == 416
    two = fleet.client.get(url, headers={**a, "Range": "bytes=0-9,20-29"})
    assert two.status_code == 206 and "last-modified" in two.headers  # the route: multipart


def test_a_reassigned_device_loses_the_old_bundle_at_once(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")
    old, new = fleet.upload_bundle(version=2, seed=1), fleet.upload_bundle(version=3, seed=2)
    fleet.assign("cam-1", old["id"])
    old_url = f"/device/v1/bundles/{old['id']}"
    assert fleet.client.get(old_url, headers={**dev, "Range": "bytes=0-9"}).status_code == 206
    fleet.assign("cam-1", new["id"])
    assert fleet.client.get(old_url, headers={**dev, "Range": "bytes=0-9"}).status_code == 404
    new_url = f"/device/v1/bundles/{new['id']}"
    r = fleet.client.get(new_url, headers={**dev, "Range": "bytes=0-9"})
    assert r.status_code == 206 and "last-modified" not in r.headers
