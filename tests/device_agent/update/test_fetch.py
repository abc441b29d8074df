"""The HTTP fetcher against a real local server that misbehaves on purpose."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent.update.errors import (
    AssignmentError,
    DownloadDigestError,
    DownloadError,
    DownloadTooLargeError,
    ServerUnavailableError,
)
from device_agent.update.fetch import HttpFetcher
from device_agent.update.state import BundleRef
from tests.bundlesim import BundleSim
from tests.httpfixtures import BundleServer, Fault, publish


@pytest.fixture
def server() -> Iterator[BundleServer]:
    srv = BundleServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def bundle(sim: BundleSim) -> Path:
    return publish(sim, version=2, seed=2)


def offered_ref(server: BundleServer, bundle: Path, **kw: object) -> BundleRef:
    doc = server.offer(bundle, version=2, **kw)  # type: ignore[arg-type]
    return BundleRef.from_json(doc["desired"])


def fetcher(server: BundleServer, **kw: object) -> HttpFetcher:
    return HttpFetcher(server.url, sleep=lambda s: None, **kw)  # type: ignore[arg-type]


def test_assignment_is_fetched_then_304_with_its_etag(server: BundleServer, bundle: Path) -> None:
    server.offer(bundle, version=2)
    f = fetcher(server)
    assignment, etag = f.get_assignment(None)
    assert assignment is not None and assignment.desired is not None
    assert assignment.desired.version == 2 and etag
    again, etag2 = f.get_assignment(etag)
    assert again is None and etag2 == etag
    assert server.requests[-1].headers["If-None-Match"] == etag
    assert server.requests[-1].status == 304


def test_changed_assignment_is_fetched_again(server: BundleServer, sim: BundleSim) -> None:
    server.offer(publish(sim, version=2, seed=2), version=2)
    f = fetcher(server)
    _, etag = f.get_assignment(None)
    server.offer(publish(sim, version=3, seed=3), version=3)
    assignment, etag3 = f.get_assignment(etag)
    assert assignment is not None and assignment.desired is not None
    assert assignment.desired.version == 3 and etag3 != etag


def test_download_resumes_with_range_after_connection_dropped_mid_body(
    server: BundleServer, bundle: Path, tmp_path: Path
) -> None:
    ref = offered_ref(server, bundle)
    server.faults[ref.bundle_id] = Fault(drop_after=5000)
    path = fetcher(server).download(ref, tmp_path / "dl", 10**6)
    assert path.read_bytes() == bundle.read_bytes()
    reqs = server.bundle_requests(ref.bundle_id)
    assert [r.status for r in reqs] == [200, 206]
    assert reqs[0].sent == 5000
    assert reqs[1].headers["Range"] == "bytes=5000-"
    assert not (tmp_path / "dl" / f"{ref.bundle_id}.part").exists()


def test_download_resumes_a_part_left_by_an_earlier_process(
    server: BundleServer, bundle: Path, tmp_path: Path
) -> None:
    ref = offered_ref(server, bundle)
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / f"{ref.bundle_id}.part").write_bytes(bundle.read_bytes()[:3000])
    path = fetcher(server).download(ref, dl, 10**6)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ref.sha256
    (req,) = server.bundle_requests(ref.bundle_id)
    assert req.headers["Range"] == "bytes=3000-" and req.status == 206
    assert req.sent == ref.size - 3000


def test_download_starts_over_when_server_ignores_range(
    server: BundleServer, bundle: Path, tmp_path: Path
) -> None:
    ref = offered_ref(server, bundle)
    server.faults[ref.bundle_id] = Fault(ignore_range=True)
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / f"{ref.bundle_id}.part").write_bytes(bundle.read_bytes()[:3000])
    path = fetcher(server).download(ref, dl, 10**6)
    assert path.read_bytes() == bundle.read_bytes()
    assert [r.status for r in server.bundle_requests()] == [200]


def test_download_starts_over_after_416(server: BundleServer, bundle: Path, tmp_path: Path) -> None:
    ref = offered_ref(server, bundle)
    server.faults[ref.bundle_id] = Fault(refuse_range_times=1)
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / f"{ref.bundle_id}.part").write_bytes(b"x" * 4000)  # not a prefix of the file
    path = fetcher(server).download(ref, dl, 10**6)
    assert path.read_bytes() == bundle.read_bytes()
    reqs = server.bundle_requests()
    assert [r.status for r in reqs] == [416, 200]
    assert "Range" not in reqs[1].headers


def test_wrong_bytes_fail_the_digest_check_and_are_deleted(
    server: BundleServer, bundle: Path, tmp_path: Path
) -> None:
    ref = offered_ref(server, bundle)
    server.faults[ref.bundle_id] = Fault(wrong_bytes=True)
    with pytest.raises(DownloadDigestError, match="sha256") as e:
        fetcher(server).download(ref, tmp_path / "dl", 10**6)
    assert e.value.code == "download_hash_mismatch"
    assert list((tmp_path / "dl").iterdir()) == []


def test_endless_download_is_cut_off_at_the_cap(
    server: BundleServer, bundle: Path, tmp_path: Path
) -> None:
    cap = 64 * 1024
    ref = offered_ref(server, bundle, size=cap)
    server.faults[ref.bundle_id] = Fault(endless=True)
    with pytest.raises(DownloadTooLargeError, match="cut off") as e:
        fetcher(server, chunk_bytes=8192).download(ref, tmp_path / "dl", cap)
    assert e.value.code == "oversized_download"
    assert list((tmp_path / "dl").iterdir()) == []  # nothing kept
    (req,) = server.bundle_requests()
    # the client hung up: the server's 30 s stream ended early (socket buffers aside)
    assert req.sent < 64 * 1024 * 1024


def test_bundle_announced_above_the_cap_is_not_downloaded(
    server: BundleServer, bundle: Path, tmp_path: Path
) -> None:
    ref = offered_ref(server, bundle)
    with pytest.raises(DownloadTooLargeError, match="max_bundle_bytes"):
        fetcher(server).download(ref, tmp_path / "dl", ref.size - 1)
    assert server.bundle_requests() == []


def test_repeated_drops_give_up_but_keep_the_part_for_next_time(
    server: BundleServer, bundle: Path, tmp_path: Path
) -> None:
    ref = offered_ref(server, bundle)
    server.faults[ref.bundle_id] = Fault(drop_after=2000, drop_times=3)
    with pytest.raises(DownloadError, match="will resume") as e:
        fetcher(server, retries=2).download(ref, tmp_path / "dl", 10**6)
    assert e.value.code == "download_failed"
    part = tmp_path / "dl" / f"{ref.bundle_id}.part"
    assert part.stat().st_size == 6000
    path = fetcher(server).download(ref, tmp_path / "dl", 10**6)
    assert path.read_bytes() == bundle.read_bytes()
    assert server.bundle_requests()[-1].headers["Range"] == "bytes=6000-"


def test_unreachable_server_is_reported_as_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = HttpFetcher(f"http://127.0.0.1:{port}", timeout=2)
    with pytest.raises(ServerUnavailableError, match="cannot reach"):
        f.get_assignment(None)


def test_malformed_assignment_is_rejected_by_name(server: BundleServer, bundle: Path) -> None:
    doc = server.offer(bundle, version=2)
    del doc["desired"]["sha256"]
    with pytest.raises(AssignmentError, match="sha256"):
        fetcher(server).get_assignment(None)
    doc["desired"]["sha256"] = "zz"
    with pytest.raises(AssignmentError, match="64 hex digits"):
        fetcher(server).get_assignment(None)


def test_unsafe_bundle_id_is_rejected(server: BundleServer, bundle: Path) -> None:
    doc = server.offer(bundle, version=2)
    doc["desired"]["bundle_id"] = "../../etc"
    with pytest.raises(AssignmentError, match="not safe"):
        fetcher(server).get_assignment(None)


def test_reports_are_posted(server: BundleServer) -> None:
    fetcher(server).post_reports([{"type": "install", "outcome": "installed"}])
    assert server.reports == [{"type": "install", "outcome": "installed"}]
    assert json.loads(json.dumps(server.reports))  # plain JSON


def test_bearer_token_is_sent(server: BundleServer, bundle: Path) -> None:
    server.offer(bundle, version=2)
    fetcher(server, token="s3cret").get_assignment(None)
    assert server.requests[-1].headers["Authorization"] == "Bearer s3cret"
