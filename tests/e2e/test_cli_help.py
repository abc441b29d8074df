"""The operator and device CLIs: help everywhere, and bundle verification by exit code."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from device_agent.cli import main as agent_main
from fleet_server.cli import main as operator_main
from tests.bundlesim import NOW, BundleSim, tiny_onnx_model
from tests.device_agent.bundle.test_verify_attacks import ATTACKS, INSTALLED_VERSION

AT = NOW.strftime("%Y-%m-%dT%H:%M:%SZ")


def _walk(cmd: click.Command, path: tuple[str, ...] = ()):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _walk(sub, (*path, name))


ALL_COMMANDS = [("edgefleet", p, c) for p, c in _walk(operator_main)] + [
    ("edgefleet-agent", p, c) for p, c in _walk(agent_main)
]


@pytest.mark.parametrize(
    "prog,path,cmd", ALL_COMMANDS, ids=[" ".join((p, *path)) for p, path, _ in ALL_COMMANDS]
)
def test_every_command_and_option_has_help_text(
    prog: str, path: tuple[str, ...], cmd: click.Command
) -> None:
    assert (cmd.help or "").strip(), f"`{prog} {' '.join(path)}` has no help text"
    for param in cmd.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert (param.help or "").strip(), (
                f"option {param.opts} of `{prog} {' '.join(path)}` has no help text"
            )
    root = operator_main if prog == "edgefleet" else agent_main
    result = CliRunner().invoke(root, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert cmd.help.strip().splitlines()[0][:40] in " ".join(result.output.split())


@pytest.mark.parametrize("script", ["edgefleet", "edgefleet-agent"])
def test_console_scripts_are_installed_and_answer_help(script: str) -> None:
    exe = shutil.which(script)
    assert exe, f"{script} is not on PATH; is the package installed?"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Usage" in out.stdout


@pytest.fixture
def trust_file(sim: BundleSim, tmp_path: Path) -> Path:
    path = tmp_path / "trust.json"
    sim.trust("release").save(path)
    return path


def test_cli_verify_good_bundle_exits_zero_with_summary(sim: BundleSim, trust_file: Path) -> None:
    bundle = sim.publish(version=3)
    r = CliRunner().invoke(
        operator_main,
        ["bundle", "verify", str(bundle), "--trust-store", str(trust_file), "--at", AT],
    )
    assert r.exit_code == 0, r.output
    assert "tiny v3 (onnx)" in r.output and "verified: OK" in r.output
    assert "model.onnx" in r.output


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_cli_verify_refuses_attack_with_named_error(
    name: str, sim: BundleSim, tmp_path: Path
) -> None:
    attack = ATTACKS[name]
    hostile = attack.build(sim, tmp_path)
    trust = tmp_path / "attack-trust.json"
    attack.trust(sim).save(trust)
    args = [
        "bundle",
        "verify",
        str(hostile),
        "--trust-store",
        str(trust),
        "--at",
        AT,
        "--installed-version",
        str(INSTALLED_VERSION),
    ]
    if attack.limits:
        args += ["--max-member-bytes", str(attack.limits.max_member_bytes)]
    r = CliRunner().invoke(operator_main, args)
    assert r.exit_code == 1, r.output
    assert f"refused: {attack.error.__name__}" in r.output


def test_agent_cli_verify_refuses_tampered_bundle(
    sim: BundleSim, trust_file: Path, tmp_path: Path
) -> None:
    hostile = ATTACKS["one_model_byte_changed"].build(sim, tmp_path)
    r = CliRunner().invoke(agent_main, ["verify", str(hostile), "--trust-store", str(trust_file)])
    assert r.exit_code == 1 and "MemberHashMismatchError" in r.output


def test_keys_generate_writes_private_key_mode_0600(tmp_path: Path) -> None:
    r = CliRunner().invoke(
        operator_main, ["keys", "generate", "--name", "rel", "--keys-dir", str(tmp_path / "k")]
    )
    assert r.exit_code == 0, r.output
    (priv,) = (tmp_path / "k").glob("*.key")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"ENCRYPTED" not in priv.read_bytes()


def test_encrypted_key_round_trip_and_wrong_passphrase(tmp_path: Path, sim: BundleSim) -> None:
    keys = str(tmp_path / "k")
    env = {"PW": "correct horse", "BAD": "wrong"}
    runner = CliRunner(env=env)
    r = runner.invoke(
        operator_main,
        [
            "keys",
            "generate",
            "--name",
            "rel",
            "--encrypt",
            "--passphrase-env",
            "PW",
            "--keys-dir",
            keys,
        ],
    )
    assert r.exit_code == 0, r.output
    (priv,) = (tmp_path / "k").glob("*.key")
    assert b"ENCRYPTED" in priv.read_bytes()
    bundle = sim.publish(version=3, signers=())
    r = runner.invoke(
        operator_main,
        [
            "bundle",
            "sign",
            str(bundle),
            "--key",
            "rel",
            "--passphrase-env",
            "BAD",
            "--keys-dir",
            keys,
        ],
    )
    assert r.exit_code == 2 and "wrong passphrase" in r.output
    r = runner.invoke(
        operator_main,
        [
            "bundle",
            "sign",
            str(bundle),
            "--key",
            "rel",
            "--passphrase-env",
            "PW",
            "--keys-dir",
            keys,
        ],
    )
    assert r.exit_code == 0, r.output


def test_operator_flow_pack_sign_trust_verify_revoke(tmp_path: Path) -> None:
    """The whole operator flow through the CLI, as the README describes it."""
    runner = CliRunner()
    keys = ["--keys-dir", str(tmp_path / "k")]
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_onnx_model(1))
    bundle = tmp_path / "m-v5.efb"
    trust = tmp_path / "trust.json"

    def run(*args: str) -> str:
        r = runner.invoke(operator_main, list(args))
        assert r.exit_code == 0, r.output
        return r.output

    run("keys", "generate", "--name", "rel", *keys)
    listing = json.loads(run("keys", "list", "--json", *keys))
    assert listing[0]["name"] == "rel" and listing[0]["has_private"]
    out = run(
        "bundle",
        "pack",
        str(model),
        "--name",
        "m",
        "--version",
        "5",
        "--out",
        str(bundle),
        "--target-class",
        "x86_64-gateway",
        "--label",
        "team=vision",
        "--allow-placeholders",
    )
    assert "input    x: float32 ['batch', 4]" in out
    inspect = runner.invoke(operator_main, ["bundle", "inspect", str(bundle)])
    assert "(unsigned)" in inspect.output
    run("bundle", "sign", str(bundle), "--key", "rel", *keys)
    run("trust", "add", "rel", "--store", str(trust), *keys)
    assert "verified: OK" in run("bundle", "verify", str(bundle), "--trust-store", str(trust))
    entry = json.loads(run("keys", "export-public", "rel", "--format", "trust-entry", *keys))
    run("trust", "revoke", entry["keyid"], "--store", str(trust))
    r = runner.invoke(operator_main, ["bundle", "verify", str(bundle), "--trust-store", str(trust)])
    assert r.exit_code == 1 and "RevokedKeyError" in r.output


def test_verify_with_missing_trust_store_says_how_to_create_it(
    sim: BundleSim, tmp_path: Path
) -> None:
    r = CliRunner().invoke(
        operator_main,
        ["bundle", "verify", str(sim.publish()), "--trust-store", str(tmp_path / "none.json")],
    )
    assert r.exit_code == 2 and "edgefleet trust add" in r.output
