"""Finding 5: a trust store loads only in its one valid shape, and revoking takes only a
key id (the operator's typo must not silently leave a key trusted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from device_agent.bundle import TrustStore
from fleet_server.cli.keys import trust as trust_cli
from tests.bundlesim import BundleSim


def store_json(sim: BundleSim, **override: Any) -> dict[str, Any]:
    obj = sim.trust("release", "backup").to_json()
    obj.update(override)
    return obj


@pytest.mark.parametrize(
    "revoked",
    ["0123456789abcdef0123456789abcdef", {"x": 1}, [1], ["not-a-key-id"], ["ABCDEF" * 5 + "AB"]],
    ids=["string", "object", "number", "not-hex", "upper-case"],
)
def test_revoked_must_be_a_list_of_key_ids(sim: BundleSim, revoked: Any) -> None:
    with pytest.raises(ValueError, match="revoked"):
        TrustStore.from_json(store_json(sim, revoked=revoked))


@pytest.mark.parametrize("threshold", [2.9, True, "2", 0, -1, None, 2**70], ids=repr)
def test_threshold_must_be_a_positive_integer(sim: BundleSim, threshold: Any) -> None:
    with pytest.raises(ValueError, match="threshold"):
        TrustStore.from_json(store_json(sim, threshold=threshold))


def test_threshold_above_the_number_of_keys_is_refused(sim: BundleSim) -> None:
    with pytest.raises(ValueError, match="threshold"):
        TrustStore.from_json(store_json(sim, threshold=3))


@pytest.mark.parametrize(
    "field,value",
    [("keys", {"a": 1}), ("keys", [["x"]]), ("version", 2), ("extra", 1)],
)
def test_other_shapes_are_refused(sim: BundleSim, field: str, value: Any) -> None:
    with pytest.raises(ValueError):
        TrustStore.from_json(store_json(sim, **{field: value}))


def test_a_valid_store_round_trips(sim: BundleSim) -> None:
    obj = store_json(sim, threshold=2)
    assert TrustStore.from_json(obj).to_json() == obj


@pytest.mark.parametrize("bad", ["ABCDEF", "0123", "zz" * 16, "", "0123456789abcdef" * 3])
def test_revoke_refuses_what_is_not_a_key_id(sim: BundleSim, bad: str) -> None:
    store = sim.trust("release")
    with pytest.raises(ValueError, match="key id"):
        store.revoke(bad)
    assert store.revoked == set()


def test_cli_revoke_of_an_upper_case_id_revokes_that_key(sim: BundleSim, tmp_path: Path) -> None:
    """The finding: an upper-case id was stored as given and matched nothing."""
    path = tmp_path / "trust.json"
    store = sim.trust("release")
    store.save(path)
    (kid,) = store.keys
    r = CliRunner().invoke(trust_cli, ["revoke", kid.upper(), "--store", str(path)])
    assert r.exit_code == 0, r.output
    assert json.loads(path.read_text())["revoked"] == [kid]


@pytest.mark.parametrize("bad", ["nonsense", "0123", "g" * 32])
def test_cli_revoke_refuses_a_malformed_id_and_leaves_the_store(
    sim: BundleSim, tmp_path: Path, bad: str
) -> None:
    path = tmp_path / "trust.json"
    sim.trust("release").save(path)
    before = path.read_bytes()
    r = CliRunner().invoke(trust_cli, ["revoke", bad, "--store", str(path)])
    assert r.exit_code != 0
    assert "key id" in r.output
    assert path.read_bytes() == before


def test_a_store_file_with_a_string_revoked_list_does_not_load(
    sim: BundleSim, tmp_path: Path
) -> None:
    path = tmp_path / "trust.json"
    path.write_text(json.dumps(store_json(sim, revoked="0123456789abcdef0123456789abcdef")))
    with pytest.raises(ValueError, match=str(path)):
        TrustStore.load(path)
