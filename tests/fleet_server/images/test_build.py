"""Device-class recipes and provisioning images, installed with no package index."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from device_agent.config import AgentConfig
from fleet_server.cli import main as cli_main
from fleet_server.images import RecipeError, build_image, list_classes, load_class
from fleet_server.images.build import ImageBuildError
from fleet_server.images.recipe import CLASSES_DIR
from fleet_server.registry.uptane import init_uptane
from tests.bundlesim import BundleSim


def test_three_device_classes_ship_with_the_project() -> None:
    classes = {name: load_class(name) for name in list_classes()}
    assert {"x86_64-gateway", "aarch64-board", "aarch64-legacy"} <= set(classes)
    gw, board, legacy = (classes[n] for n in ("x86_64-gateway", "aarch64-board", "aarch64-legacy"))
    assert (gw.architecture, gw.model_format, gw.precision, gw.extra) == (
        "x86_64",
        "onnx",
        "float32",
        "agent-onnx",
    )
    assert (board.architecture, board.model_format, board.precision, board.extra) == (
        "aarch64",
        "tflite",
        "int8",
        "agent-tflite",
    )
    assert legacy.extra == "agent-tflite-legacy" and legacy.architecture == "aarch64"


def test_unknown_class_names_the_known_ones() -> None:
    with pytest.raises(RecipeError, match="x86_64-gateway"):
        load_class("no-such-board")


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> BundleSim:
    """The release keys whose trust root the images ship."""
    return BundleSim(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def trust_file(release: BundleSim) -> Path:
    path = release.root.parent / f"{release.root.name}-trust.json"
    release.trust("release").save(path)
    return path


@pytest.fixture(scope="module")
def device_roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Uptane chain's initial roots, as `edgefleet release init` writes them."""
    base = tmp_path_factory.mktemp("uptane")
    return init_uptane(operator_keys=base / "offline", uptane_dir=base / "uptane").device_roots


@pytest.fixture(scope="module")
def x86_image(tmp_path_factory: pytest.TempPathFactory, trust_file: Path, device_roots: Path):
    out = tmp_path_factory.mktemp("images")
    return build_image(
        load_class("x86_64-gateway"),
        out_dir=out,
        trust_store=trust_file,
        server_url="http://127.0.0.1:9",
        mqtt_host="127.0.0.1",
        mqtt_port=9,
        uptane_roots=device_roots,
    )


def test_image_build_refuses_a_roots_directory_without_both_roots(
    tmp_path: Path, trust_file: Path, device_roots: Path
) -> None:
    partial = tmp_path / "roots"
    partial.mkdir()
    shutil.copy(device_roots / "image-root.json", partial)
    with pytest.raises(ImageBuildError, match="director-root.json.*edgefleet release init"):
        build_image(
            load_class("x86_64-gateway"),
            out_dir=tmp_path,
            trust_store=trust_file,
            uptane_roots=partial,
        )
    (partial / "director-root.json").write_text('{"signed": {"_type": "targets"}}')
    with pytest.raises(ImageBuildError, match="not TUF root metadata|not a root"):
        build_image(
            load_class("x86_64-gateway"),
            out_dir=tmp_path,
            trust_store=trust_file,
            uptane_roots=partial,
        )
    assert not list(tmp_path.glob("x86_64-gateway*")), "nothing is built from bad roots"


def test_image_lists_every_file_with_its_hash(x86_image) -> None:
    meta = json.loads((x86_image.directory / "image.json").read_text())
    assert meta["device_class"] == "x86_64-gateway" and meta["image_version"] == x86_image.version
    for rel in (
        "agent.toml",
        "trust.json",
        "install.sh",
        "firstboot.sh",
        "edgefleet-agent.service",
    ):
        assert rel in meta["files"]
    assert any(name.startswith("wheels/onnxruntime-") for name in meta["files"])
    assert x86_image.archive.exists()


def _no_network_prefix() -> list[str]:
    """Run the install in a network namespace with no interfaces up, when we can."""
    if os.geteuid() == 0 and shutil.which("unshare"):
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-n"]
    return []


def test_x86_image_installs_with_no_package_index_and_verifies_bundles(
    x86_image, tmp_path: Path, release: BundleSim, device_roots: Path
) -> None:
    prefix, conf, state = tmp_path / "opt", tmp_path / "etc", tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(EDGEFLEET_NO_SYSTEMD="1", PIP_NO_INDEX="1")
    cmd = [
        *_no_network_prefix(),
        "sh",
        str(x86_image.directory / "install.sh"),
        str(prefix),
        str(conf),
        str(state),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    agent = prefix / "venv" / "bin" / "edgefleet-agent"
    python = prefix / "venv" / "bin" / "python"
    absent = subprocess.run([str(python), "-c", "import fastapi"], capture_output=True)
    assert absent.returncode != 0, "the device image must not carry the server stack"
    config = (conf / "agent.toml").read_text()
    assert f'trust_store = "{conf}/trust.json"' in config and "@" not in config
    # the chain's initial roots are installed and the agent runs the chain from them
    uptane = AgentConfig.load(conf / "agent.toml").uptane
    assert uptane.enabled is True
    for name in ("image-root", "director-root"):
        path = getattr(uptane, name.replace("-", "_"))
        assert path == conf / "uptane" / f"{name}.json"
        assert path.read_bytes() == (device_roots / f"{name}.json").read_bytes()
    # the installed agent trusts exactly the image's trust root
    bundle = release.publish(version=3)
    ok = subprocess.run(
        [str(agent), "verify", str(bundle), "--trust-store", str(conf / "trust.json")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    stranger = release.publish(version=4, signers=("someone-else",))
    bad = subprocess.run(
        [str(agent), "verify", str(stranger), "--trust-store", str(conf / "trust.json")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "UntrustedKeyError" in bad.stderr


@pytest.mark.parametrize(
    "name,runtime_wheel,numpy_major",
    [
        ("aarch64-board", "ai_edge_litert-", 2),
        ("aarch64-legacy", "tflite_runtime-2.14.0-", 1),
    ],
)
def test_aarch64_images_carry_aarch64_wheels(
    name: str, runtime_wheel: str, numpy_major: int, tmp_path: Path, trust_file: Path
) -> None:
    info = build_image(load_class(name), out_dir=tmp_path, trust_store=trust_file)
    binary = [w for w in info.wheels if not w.endswith("-none-any.whl")]
    assert binary and all("aarch64" in w for w in binary), binary
    assert any(w.startswith(runtime_wheel) for w in info.wheels), info.wheels
    meta = json.loads((info.directory / "image.json").read_text())
    runtime = next(w for w in info.wheels if w.startswith(runtime_wheel))
    assert meta["requires"]["glibc"] == load_class(name).glibc
    assert meta["requires"]["python"] == "3.11"
    assert meta["wheel_glibc"][runtime] <= meta["requires"]["glibc"]
    (np_wheel,) = [w for w in info.wheels if w.startswith("numpy-")]
    assert np_wheel.split("-")[1].startswith(f"{numpy_major}.")
    assert not any(w.startswith("onnxruntime-") for w in info.wheels)


def test_installed_image_enrolls_and_receives_a_bundle(
    tmp_path: Path, release: BundleSim, trust_file: Path
) -> None:
    """Install offline, then first boot: enroll with a one-time token, get the assigned bundle."""
    import secrets
    import time

    from fleet_server.broker.mosquitto import SERVER_USER, LocalMosquitto
    from fleet_server.client import AdminClient
    from fleet_server.demo.services import ServerProcess

    broker = LocalMosquitto(tmp_path / "broker")
    broker.add_user(SERVER_USER, "server-pw")
    broker.start()
    admin_token = "img-admin-" + secrets.token_urlsafe(24)
    server = ServerProcess(
        tmp_path / "server",
        {
            "environment": "development",
            "database_url": f"sqlite:///{tmp_path / 'server.db'}",
            "bundle_dir": str(tmp_path / "bundles"),
            "trust_store": str(trust_file),
            "admin_bootstrap_token": admin_token,
            "mqtt_host": "127.0.0.1",
            "mqtt_port": str(broker.port),
            "mqtt_username": SERVER_USER,
            "mqtt_password": "server-pw",
        },
    )
    agent_proc: subprocess.Popen[bytes] | None = None
    try:
        server.start()
        admin = AdminClient(server.url, admin_token)
        image = build_image(
            load_class("x86_64-gateway"),
            out_dir=tmp_path / "images",
            trust_store=trust_file,
            server_url=server.url,
            mqtt_host="127.0.0.1",
            mqtt_port=broker.port,
        )
        prefix, conf, state = tmp_path / "opt", tmp_path / "etc", tmp_path / "state"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env.update(EDGEFLEET_NO_SYSTEMD="1", PIP_NO_INDEX="1")
        out = subprocess.run(
            [
                *_no_network_prefix(),
                "sh",
                str(image.directory / "install.sh"),
                str(prefix),
                str(conf),
                str(state),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr

        bundle = admin.upload_bundle(release.publish(version=3))
        group = admin.post("/groups", json={"name": "gateways", "device_class": "x86_64-gateway"})
        token = admin.post("/enrollment-tokens", json={"device_class": "x86_64-gateway"})
        (conf / "enrollment-token").write_text(token["token"])
        first = subprocess.run(
            [str(prefix / "firstboot.sh")], capture_output=True, text=True, env=env, timeout=120
        )
        assert first.returncode == 0, first.stderr
        assert not (conf / "enrollment-token").exists(), "the one-time token is consumed"
        device_id = json.loads((state / "identity.json").read_text())["device_id"]
        broker.add_user(device_id, (conf / "device-credential").read_text().strip())
        broker.reload()
        admin.post(
            "/rollouts",
            json={
                "name": "first model",
                "bundle_id": bundle["id"],
                "group": group["id"],
                "strategy": "all_at_once",
                "gates": [],
                "start": True,
                "stages": [{"percent": 100, "soak_seconds": 0}],
            },
        )

        agent_proc = subprocess.Popen(
            [
                str(prefix / "venv" / "bin" / "edgefleet-agent"),
                "--config",
                str(conf / "agent.toml"),
                "run",
            ],
            env={
                **env,
                "EDGEFLEET_AGENT_SERVER_POLL_SECONDS": "1",
                "EDGEFLEET_AGENT_UPDATE_PROBATION_SECONDS": "0",
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        active: dict[str, object] = {}
        while time.monotonic() < deadline and agent_proc.poll() is None:
            path = state / "active.json"
            if path.exists():
                active = json.loads(path.read_text())
                if active.get("version") == 3:
                    break
            time.sleep(0.3)
        assert active.get("version") == 3, (
            active,
            agent_proc.stderr.read().decode()[-2000:] if agent_proc.poll() else "",
        )
        device = admin.get(f"/devices/{device_id}")
        assert device["device_class"] == "x86_64-gateway"
    finally:
        if agent_proc is not None:
            agent_proc.terminate()
            try:
                agent_proc.wait(15)
            except subprocess.TimeoutExpired:
                agent_proc.kill()
        server.stop()
        broker.stop()


def _recipe_copy(name: str, tmp_path: Path, **changes: str) -> Path:
    """A copy of a shipped recipe with some ``[class]`` keys changed."""
    text = (CLASSES_DIR / f"{name}.toml").read_text()
    for key, value in changes.items():
        text, n = re.subn(rf"^{key} = .*$", f'{key} = "{value}"', text, flags=re.M)
        assert n == 1, key
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_image_records_the_oldest_glibc_and_python_it_supports(x86_image) -> None:
    meta = json.loads((x86_image.directory / "image.json").read_text())
    assert meta["requires"]["python"] == "3.11" and meta["requires"]["glibc"] == "2.28"
    ort = next(w for w in meta["wheel_glibc"] if w.startswith("onnxruntime-"))
    assert meta["wheel_glibc"][ort] <= "2.28"
    install = (x86_image.directory / "install.sh").read_text()
    assert '"@PYTHON@"' not in install and '"3.11" "2.28"' in install


def test_image_build_refuses_a_class_whose_wheel_needs_a_newer_glibc_than_declared(
    tmp_path: Path, trust_file: Path
) -> None:
    """tflite-runtime 2.14's aarch64 wheel is manylinux_2_34; a recipe claiming 2.31 boards."""
    recipe = _recipe_copy("aarch64-legacy", tmp_path, glibc="2.31")
    out = tmp_path / "images"
    result = CliRunner().invoke(
        cli_main,
        ["image", "build", str(recipe), "--trust-store", str(trust_file), "--out", str(out)],
    )
    assert result.exit_code == 1, result.output
    refusal = result.output
    assert "aarch64-legacy refused" in refusal
    assert re.search(
        r"wheel tflite_runtime-2\.14\.0-cp311-cp311-manylinux_2_34_aarch64\.whl needs glibc 2\.34"
        r" or newer, but the recipe declares the class's oldest glibc as 2\.31",
        refusal,
    ), refusal
    assert not (out / "aarch64-legacy").exists(), "no image is left for a refused class"


def test_image_build_refuses_a_class_whose_runtime_has_no_wheel_for_its_python(
    tmp_path: Path, trust_file: Path
) -> None:
    """tflite-runtime 2.14 has no wheel for Python 3.13: the refusal names both."""
    recipe = _recipe_copy("aarch64-legacy", tmp_path, python="3.13")
    result = CliRunner().invoke(
        cli_main,
        ["image", "build", str(recipe), "--trust-store", str(trust_file), "--out", str(tmp_path)],
    )
    assert result.exit_code == 1, result.output
    assert "downloading wheels for aarch64-legacy (Python 3.13" in result.output, result.output
    assert "tflite-runtime" in result.output, result.output


def test_install_refuses_a_device_whose_glibc_is_older_than_the_image_needs(
    tmp_path: Path, trust_file: Path
) -> None:
    """The image's own install.sh checks the device before installing anything."""
    recipe = _recipe_copy("x86_64-gateway", tmp_path, glibc="9.99")
    image = build_image(load_class(recipe), out_dir=tmp_path / "images", trust_store=trust_file)
    prefix = tmp_path / "opt"
    out = subprocess.run(
        ["sh", str(image.directory / "install.sh"), str(prefix), str(tmp_path / "etc")],
        capture_output=True,
        text=True,
        env={**os.environ, "EDGEFLEET_NO_SYSTEMD": "1"},
        timeout=120,
    )
    assert out.returncode != 0
    assert "this image needs glibc 9.99 or newer; this system has glibc 2." in out.stderr
    assert not (prefix / "venv").exists()
