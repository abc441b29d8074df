"""An arm64 Debian root with Python, run under QEMU user emulation, for tests.

:func:`cached_root` builds a minimal Debian root for arm64 (``debootstrap --arch=arm64``,
both stages run through ``qemu-aarch64-static`` registered with ``binfmt_misc``) once, and
keeps it OUTSIDE the git checkout, in ``$EDGEFLEET_TEST_CACHE`` (default
``/var/cache/edgefleet-test``) under ``arm64-root-<key>``, where ``key`` hashes every input
(Debian suite, variant, package list, fixture version): CI on the same machine reuses it,
and a change of input builds a new one. The build runs under a file lock (one build at a
time across processes), into a temporary folder renamed into place when complete.

:func:`device_root` copies the cached root for one test (installing an image into it must
not change the cache), and :class:`Arm64Root` runs commands in it: ``chroot`` in a private
mount namespace (``/proc``, ``/sys`` and ``/dev`` mounted inside it, gone when the command
ends; TFLite's cpuinfo reads ``/sys/devices/system/cpu`` and crashes without it), with an
aarch64 ``/proc/cpuinfo`` bind-mounted over the host's (see :func:`cpuinfo_text`),
optionally with no network (``unshare -n``), every command at the lowest CPU and I/O
priority (``nice -n 19 ionice -c3``: emulation is heavy and the machine is shared).

Nothing here skips: when emulation cannot be set up (not root, a package that will not
install, ``binfmt_misc`` that will not mount), :class:`EmulationError` says why and the
test fails with it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"  # glibc 2.36, Python 3.11: what the aarch64 classes' wheels need
VARIANT = "minbase"
PACKAGES = ("python3", "python3-venv")
FIXTURE_VERSION = 1
ARCH = "arm64"
MIRROR = os.environ.get("EDGEFLEET_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CACHE_DIR = Path(os.environ.get("EDGEFLEET_TEST_CACHE", "/var/cache/edgefleet-test"))
QEMU = "/usr/bin/qemu-aarch64-static"
QEMU_CPU = os.environ.get("EDGEFLEET_QEMU_CPU", "cortex-a72")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# the ELF header of an aarch64 executable, as Debian's qemu-user-static registers it
_AARCH64_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
_AARCH64_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
HEAVY = ("nice", "-n", "19", "ionice", "-c3")
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# what /proc/cpuinfo says of each core of the emulated CPU (the MIDR fields and the Features
# line a board with that core shows): (implementer, variant, part, revision, features)
_CPUINFO = {
    "cortex-a53": (0x41, 0x0, 0xD03, 4, "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
    "cortex-a72": (0x41, 0x0, 0xD08, 3, "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
    "cortex-a76": (
        0x41,
        0x4,
        0xD0B,
        1,
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
        "lrcpc dcpop asimddp",
    ),
    "neoverse-n1": (
        0x41,
        0x3,
        0xD0C,
        1,
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
        "lrcpc dcpop asimddp ssbs",
    ),
}
MARKER = ".edgefleet-test-root.json"

Say = Callable[[str], None]


class EmulationError(RuntimeError):
    """Emulated arm64 could not be set up; the message says which step and what to do."""


def _quiet(_msg: str) -> None:
    pass


def _run(cmd: Sequence[str], what: str, timeout: float = 600) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EmulationError(f"{what}: {e}") from e
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-10:])
        raise EmulationError(f"{what} failed (exit {out.returncode}):\n{tail}")
    return out.stdout


def _install_host_packages(say: Say) -> None:
    missing = [
        pkg
        for tool, pkg in (
            (QEMU, "qemu-user-static"),
            ("/usr/sbin/debootstrap", "debootstrap"),
            ("/usr/sbin/update-binfmts", "binfmt-support"),
        )
        if not Path(tool).exists()
    ]
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise EmulationError(f"install {', '.join(missing)}: no apt-get on this machine")
    say(f"installing {' '.join(missing)} with apt-get")
    _run([*HEAVY, "apt-get", "update", "-qq"], "apt-get update", timeout=900)
    env_cmd = ["env", "DEBIAN_FRONTEND=noninteractive"]
    _run(
        [*env_cmd, *HEAVY, "apt-get", "install", "-y", "-qq", *missing],
        f"apt-get install {' '.join(missing)}",
        timeout=1800,
    )


def _registered() -> bool:
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists():
        return False
    text = entry.read_text()
    # F: the interpreter is opened when registered, so it works inside a chroot
    flags = next((ln.split(":", 1)[1] for ln in text.splitlines() if ln.startswith("flags:")), "")
    return text.startswith("enabled") and "F" in flags


def ensure_emulation(say: Say = _quiet) -> None:
    """Make this machine run aarch64 programs: packages, ``binfmt_misc`` and its entry."""
    if os.geteuid() != 0:
        raise EmulationError(
            "emulated arm64 needs root (debootstrap, chroot, binfmt_misc); run the tests as root"
        )
    _install_host_packages(say)
    if not (BINFMT / "register").exists():
        say("mounting binfmt_misc")
        _run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
            "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc",
        )
    if not _registered():
        say("registering qemu-aarch64 with binfmt_misc")
        if shutil.which("update-binfmts") and Path("/usr/share/binfmts/qemu-aarch64").exists():
            subprocess.run(
                ["update-binfmts", "--import", "qemu-aarch64"], capture_output=True, timeout=60
            )
        if not _registered():
            if (BINFMT / "qemu-aarch64").exists():
                (BINFMT / "qemu-aarch64").write_text("-1")  # an entry without F: replace it
            try:
                (BINFMT / "register").write_text(
                    f":qemu-aarch64:M::{_AARCH64_MAGIC}:{_AARCH64_MASK}:{QEMU}:F"
                )
            except OSError as e:
                raise EmulationError(f"registering qemu-aarch64 with binfmt_misc: {e}") from e
    if not _registered():
        entry = BINFMT / "qemu-aarch64"
        says = entry.read_text() if entry.exists() else "nothing"
        raise EmulationError(
            f"qemu-aarch64 is not registered with binfmt_misc (with the F flag); {entry} says: "
            f"{says}"
        )


def root_inputs() -> dict[str, object]:
    """Everything the cached root depends on (its cache key hashes this)."""
    return {
        "arch": ARCH,
        "suite": SUITE,
        "variant": VARIANT,
        "packages": sorted(PACKAGES),
        "fixture_version": FIXTURE_VERSION,
    }


def root_key() -> str:
    blob = json.dumps(root_inputs(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_root(say: Say = _quiet) -> Path:
    """The cached arm64 root (built on first use, under a file lock); returns its path."""
    ensure_emulation(say)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    key = root_key()
    final = CACHE_DIR / f"arm64-root-{key}"
    with open(CACHE_DIR / f"arm64-root-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MARKER).exists():
            return final
        if final.exists():  # a root without its marker is incomplete: start over
            shutil.rmtree(final)
        building = CACHE_DIR / f".arm64-root-{key}.building"
        if building.exists():
            shutil.rmtree(building)
        log = CACHE_DIR / f"arm64-root-{key}.log"
        say(f"building the arm64 {SUITE} root (debootstrap under QEMU; log {log})")
        started = time.monotonic()
        cmd = [
            *HEAVY,
            "debootstrap",
            f"--arch={ARCH}",
            f"--variant={VARIANT}",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(building),
            MIRROR,
        ]
        with open(log, "w") as out:
            try:
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=3600)
            except subprocess.TimeoutExpired as e:
                raise EmulationError(f"debootstrap took over an hour; see {log}") from e
        if rc.returncode != 0:
            tail = "\n".join(log.read_text().strip().splitlines()[-15:])
            raise EmulationError(f"debootstrap --arch={ARCH} {SUITE} failed; {log} ends:\n{tail}")
        _finish_root(building, time.monotonic() - started)
        os.replace(building, final)
        say(f"arm64 root built: {final}")
        return final


def _finish_root(building: Path, seconds: float) -> None:
    """Drop the downloaded packages and lists, check python3 runs as aarch64, mark it done."""
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (building / leftover).glob("*"):
            if p.is_file():
                p.unlink()
    check = Arm64Root(building).run(
        ["python3", "-c", "import ensurepip, platform, venv; print(platform.machine())"],
        network=False,
        timeout=300,
    )
    if check.returncode != 0 or check.stdout.strip() != "aarch64":
        raise EmulationError(
            f"the new arm64 root's python3 does not run as aarch64: "
            f"{check.stdout.strip()!r} {check.stderr.strip()[-500:]}"
        )
    (building / MARKER).write_text(
        json.dumps({**root_inputs(), "build_seconds": round(seconds, 1)}, indent=2) + "\n"
    )


def root_record(path: Path) -> dict[str, object]:
    """The cached root's marker: its inputs and how long its build took."""
    record: dict[str, object] = json.loads((path / MARKER).read_text())
    return record


def _host_cpus() -> list[int]:
    """The CPU numbers ``/sys/devices/system/cpu/possible`` lists (``0-1``, ``0,2-3``)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    cpus: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return cpus


def cpuinfo_text(cpu: str = QEMU_CPU, cpus: Sequence[int] | None = None) -> str:
    """``/proc/cpuinfo`` as an aarch64 Linux kernel writes it for ``cpu``, one entry per CPU
    of this machine (``/sys``, bind-mounted in, lists the host's CPUs).

    qemu-user 7.2 passes ``/proc/cpuinfo`` through from the host, so an emulated program
    reads an x86-64 one ("vendor_id: AuthenticAMD", no "CPU part"); a board never shows
    that. ai-edge-litert 2.3.0's cpuinfo (``cpuinfo_arm_linux_init``) then writes out of
    bounds and the process dies with SIGSEGV when an Interpreter is created, on every
    QEMU CPU model; with the board's cpuinfo it runs.
    """
    try:
        implementer, variant, part, revision, features = _CPUINFO[cpu]
    except KeyError as e:
        raise EmulationError(
            f"no /proc/cpuinfo for QEMU CPU {cpu!r}; set EDGEFLEET_QEMU_CPU to one of "
            f"{', '.join(sorted(_CPUINFO))}"
        ) from e
    entries = [
        f"processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\n"
        f"CPU implementer\t: 0x{implementer:02x}\nCPU architecture: 8\n"
        f"CPU variant\t: 0x{variant:x}\nCPU part\t: 0x{part:03x}\n"
        f"CPU revision\t: {revision}\n"
        for n in (cpus if cpus is not None else _host_cpus())
    ]
    return "\n".join(entries) + "\n"


def cpuinfo_file(cpu: str = QEMU_CPU) -> Path:
    """:func:`cpuinfo_text` in a file under the cache (written once, atomically)."""
    text = cpuinfo_text(cpu)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = CACHE_DIR / f"cpuinfo-{cpu}-{digest}"
    if not path.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Arm64Root:
    """An arm64 root directory and how to run commands in it under emulation."""

    path: Path

    def host_path(self, inside: str | os.PathLike[str]) -> Path:
        """Where the root's ``inside`` path (absolute) is on the host."""
        return self.path / str(inside).lstrip("/")

    def command(self, args: Sequence[str], *, network: bool = True, cwd: str = "/") -> list[str]:
        """The host command that runs ``args`` in the root (chroot in a mount namespace)."""
        script = (
            'R="$1"; I="$2"; C="$3"; shift 3; '
            'mount -t proc proc "$R/proc" && mount --bind "$I" "$R/proc/cpuinfo" && '
            'mount --rbind /sys "$R/sys" && mount --rbind /dev "$R/dev" && '
            'exec chroot "$R" /bin/sh -c \'cd "$0" && exec "$@"\' "$C" "$@"'
        )
        unshare = ["unshare", "--mount", "--propagation", "private"]
        if not network:
            unshare.append("--net")
        cpuinfo = str(cpuinfo_file())
        return [
            *HEAVY,
            *unshare,
            "--",
            "/bin/sh",
            "-c",
            script,
            "sh",
            str(self.path),
            cpuinfo,
            cwd,
            *args,
        ]

    def environment(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        base = {
            "PATH": ROOT_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp",
            # a board's CPU (Raspberry Pi 4, most aarch64 SBCs): QEMU 7.2's default "max"
            # CPU offers SVE/SME, whose emulation crashes TFLite's XNNPACK kernels
            "QEMU_CPU": QEMU_CPU,
        }
        return {**base, **(env or {})}

    def run(
        self,
        args: Sequence[str],
        *,
        network: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` in the root and wait; stdout and stderr captured as text."""
        return subprocess.run(
            self.command(args, network=network, cwd=cwd),
            capture_output=True,
            text=True,
            env=self.environment(env),
            timeout=timeout,
        )

    def popen(
        self,
        args: Sequence[str],
        *,
        network: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        **kwargs: object,
    ) -> subprocess.Popen[bytes]:
        """Start ``args`` in the root; the caller ends it (``terminate`` reaches chroot's
        child: ``exec`` replaces the shells, so the process IS the emulated program)."""
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            self.command(args, network=network, cwd=cwd),
            env=self.environment(env),
            **kwargs,
        )


def device_root(dest: Path, say: Say = _quiet) -> Arm64Root:
    """A private copy of the cached root at ``dest`` (a test installs into its own copy)."""
    source = cached_root(say)
    if dest.exists():
        shutil.rmtree(dest)
    _run(
        [*HEAVY, "cp", "-a", "--reflink=auto", str(source), str(dest)],
        f"copying {source} to {dest}",
        timeout=900,
    )
    return Arm64Root(dest)
