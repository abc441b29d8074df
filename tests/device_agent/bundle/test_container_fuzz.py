"""Property: flipping any byte of a signed bundle makes the device refuse it."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.bundle import BundleError, TrustStore, verify_bundle
from device_agent.bundle.container import ByteSource, iter_headers, padding_size
from tests.bundlesim import NOW, BundleSim


@dataclass(repr=False)
class Signed:
    data: bytes
    trust: TrustStore
    end_of_marker: int  # offset just past the two zero blocks that end the archive

    def __repr__(self) -> str:
        return f"<signed bundle, {len(self.data)} bytes>"


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Signed:
    sim = BundleSim(Path(tmp_path_factory.mktemp("fuzz")))
    data = sim.publish(version=3).read_bytes()
    src = ByteSource(io.BytesIO(data))
    end = 0
    for h in iter_headers(src, 64):
        src.read_exact(h.size + padding_size(h.size), h.name)
        end = src.position
    return Signed(data, sim.trust("release"), end + 1024)


def test_good_bundle_passes_the_same_check(signed: Signed) -> None:
    assert verify_bundle(io.BytesIO(signed.data), signed.trust, now=NOW).manifest.version == 3


_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}


@settings(max_examples=600, **_SETTINGS)
@given(data=st.data())
def test_any_flipped_byte_is_refused(signed: Signed, data: st.DataObject) -> None:
    pos = data.draw(st.integers(min_value=0, max_value=len(signed.data) - 1), label="position")
    mask = data.draw(st.integers(min_value=1, max_value=255), label="xor mask")
    tampered = bytearray(signed.data)
    tampered[pos] ^= mask
    with pytest.raises(BundleError):
        verify_bundle(io.BytesIO(bytes(tampered)), signed.trust, now=NOW)


@settings(max_examples=200, **_SETTINGS)
@given(data=st.data())
def test_bundle_cut_before_its_end_marker_is_refused(signed: Signed, data: st.DataObject) -> None:
    cut = data.draw(st.integers(min_value=0, max_value=signed.end_of_marker - 1), label="cut at")
    with pytest.raises(BundleError):
        verify_bundle(io.BytesIO(signed.data[:cut]), signed.trust, now=NOW)


@settings(max_examples=100, **_SETTINGS)
@given(tail=st.binary(min_size=1, max_size=64).filter(lambda b: any(b)))
def test_bundle_with_data_appended_is_refused(signed: Signed, tail: bytes) -> None:
    with pytest.raises(BundleError):
        verify_bundle(io.BytesIO(signed.data + tail), signed.trust, now=NOW)
