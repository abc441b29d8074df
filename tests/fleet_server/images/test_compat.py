"""What a wheel needs of the device, read from its tags, against what a recipe declares."""

from __future__ import annotations

import pytest

from fleet_server.images.compat import check_wheels, glibc_needed, parse_wheel_name

TFLITE = "tflite_runtime-2.14.0-cp311-cp311-manylinux_2_34_aarch64.whl"
NUMPY = "numpy-1.26.4-cp311-cp311-manylinux_2_17_aarch64.manylinux2014_aarch64.whl"
CRYPTO = "cryptography-50.0.2-cp311-abi3-manylinux2014_aarch64.manylinux_2_17_aarch64.whl"
PROTOBUF = "protobuf-7.36.2-cp310-abi3-manylinux2014_aarch64.whl"
PURE = "click-8.5.1-py3-none-any.whl"


def test_a_wheel_with_several_platform_tags_needs_the_lowest_glibc() -> None:
    assert glibc_needed(parse_wheel_name(NUMPY)) == (2, 17)
    assert glibc_needed(parse_wheel_name(TFLITE)) == (2, 34)
    assert glibc_needed(parse_wheel_name("x-1-cp311-cp311-manylinux1_x86_64.whl")) == (2, 5)
    assert glibc_needed(parse_wheel_name(PURE)) is None


def test_wheels_within_the_declared_glibc_and_python_pass_and_are_recorded() -> None:
    problems, needs = check_wheels(
        [TFLITE, NUMPY, CRYPTO, PROTOBUF, PURE], glibc="2.34", python="3.11"
    )
    assert problems == []
    assert needs == {TFLITE: "2.34", NUMPY: "2.17", CRYPTO: "2.17", PROTOBUF: "2.17"}


def test_a_wheel_needing_a_newer_glibc_is_named_with_both_versions() -> None:
    problems, _ = check_wheels([TFLITE, NUMPY, PURE], glibc="2.31", python="3.11")
    (p,) = problems
    assert (p.wheel, p.kind, p.needs, p.declared) == (TFLITE, "glibc", "2.34", "2.31")
    assert TFLITE in p.reason and "2.34" in p.reason and "2.31" in p.reason


@pytest.mark.parametrize(
    "wheel,why",
    [
        ("numpy-2.4.6-cp312-cp312-manylinux_2_17_aarch64.whl", "Python 3.12"),
        ("numpy-1.21.0-cp39-cp39-manylinux_2_17_aarch64.whl", "Python 3.9"),
        ("lib-1.0-cp312-abi3-manylinux_2_17_aarch64.whl", "Python 3.12 and newer (abi3)"),
        ("old-1.0-py2-none-any.whl", "Python 2"),
        ("pp-1.0-pp310-pypy310_pp73-manylinux_2_17_aarch64.whl", "another implementation"),
    ],
)
def test_a_wheel_for_another_python_is_refused(wheel: str, why: str) -> None:
    problems, _ = check_wheels([wheel], glibc="2.36", python="3.11")
    (p,) = problems
    assert p.kind == "python" and why in p.reason and "3.11" in p.reason and wheel in p.reason


@pytest.mark.parametrize(
    "wheel,why",
    [
        ("numpy-2.4.6-cp311-cp311-musllinux_1_2_aarch64.whl", "musl"),
        ("thing-1.0-cp311-cp311-linux_aarch64.whl", "promises no glibc version"),
    ],
)
def test_a_wheel_not_built_for_a_glibc_floor_is_refused(wheel: str, why: str) -> None:
    problems, _ = check_wheels([wheel], glibc="2.36", python="3.11")
    (p,) = problems
    assert p.kind == "libc" and why in p.reason and wheel in p.reason


def test_a_file_that_is_not_a_wheel_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="not a wheel"):
        parse_wheel_name("numpy-2.4.6.tar.gz")
