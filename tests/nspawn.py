"""Containers with a real systemd as PID 1 (systemd-nspawn), for tests/test_systemd.py.

- :func:`rootfs`: a minimal Debian (debootstrap: systemd, python3-venv, liblz4-1),
  built once into ``.cache/nspawn/`` of the checkout (ignored by git) and
  reused while its package list is the same; building it needs root, the
  ``debootstrap`` and ``systemd-nspawn`` commands (``.ci/run`` installs them)
  and the Debian mirror.
- :class:`Container`: boots that rootfs with ``--volatile=overlay`` (a tmpfs
  upper layer: the rootfs is never changed, each container starts clean),
  ``--register=no --keep-unit`` (no host D-Bus or machined here), the host's
  network (containers reach each other on 127.0.0.1) and a private /dev/shm.
  Commands run inside through ``nsenter`` into the container's init.
  :meth:`Container.stop` powers it off (SIGTERM to nspawn) and kills it if
  that does not finish.

Facts this relies on (measured on this kind of machine): plain ``-b`` fails
without a host bus; nspawn's first child is an intermediate process, the
container's init is its child named ``systemd`` (systemd's own children carry that name from
fork to exec); ``is-system-running --wait``
fails until ``/run/systemd/private`` exists.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from procs import ROOT

PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "liblz4-1", "procps", "iproute2")
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
CACHE = ROOT / ".cache" / "nspawn"


def unavailable() -> str | None:
    """Why containers cannot run here, or None."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for cmd in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(cmd) is None:
            return f"{cmd} is not installed (apt-get install systemd-container debootstrap)"
    return None


def rootfs() -> Path:
    """The cached rootfs, built if missing (under a lock, into a temporary
    directory renamed into place, so a half-built one is never used)."""
    key = hashlib.sha256(f"{SUITE} {MIRROR} {' '.join(PACKAGES)}".encode()).hexdigest()[:12]
    path = CACHE / f"rootfs-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "etc/os-release").exists():
            return path
        tmp = CACHE / f"building-{key}"
        shutil.rmtree(tmp, ignore_errors=True)
        r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                            str(tmp), MIRROR], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"debootstrap failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        for old in CACHE.glob("rootfs-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(path)
    return path


class Container:
    """One booted container; ``run()`` executes a command inside it."""

    def __init__(self, root: Path, name: str, log_dir: Path, binds: dict[Path, str] | None = None) -> None:
        self.root = root
        self.name = name
        self.log_path = log_dir / f"{name}.nspawn.log"
        self.binds = binds or {}
        self.proc: subprocess.Popen | None = None
        self.leader = 0

    def boot(self, timeout: float = 60.0) -> "Container":
        argv = ["systemd-nspawn", "-q", "-D", str(self.root), "-b", "--register=no", "--keep-unit",
                "--console=passive", "--volatile=overlay", "-M", self.name]
        argv += [f"--bind-ro={src}:{dst}" for src, dst in self.binds.items()]
        self._logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}:\n{self.log()}")
            self.leader = self._init()
            if time.monotonic() > deadline:
                raise RuntimeError(f"container {self.name}: no systemd after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        while self.run(["test", "-S", "/run/systemd/private"], check=False).returncode != 0:
            if not os.path.exists(f"/proc/{self.leader}"):   # not the init after all: look again
                self.leader = self._init() or self.leader
            if time.monotonic() > deadline:
                raise RuntimeError(f"container {self.name}: systemd never made its bus:\n{self.log()}")
            time.sleep(0.05)
        state = self.run(["systemctl", "is-system-running", "--wait"], check=False).stdout.strip()
        if state not in ("running", "degraded"):
            raise RuntimeError(f"container {self.name}: system is {state!r}:\n{self.log()}")
        return self

    def _init(self) -> int:
        """The container's init among nspawn's descendants (0 while there is
        none yet): a process named systemd whose parent is not one, since a
        child systemd forks for a unit carries its name until it execs."""
        for c in self._children(self.proc.pid):
            if _comm(c) == "systemd" and _comm(_ppid(c)) != "systemd":
                return c
        return 0

    @staticmethod
    def _children(pid: int) -> list[int]:
        out = []
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
        except OSError:
            return []
        return out + [g for c in out for g in Container._children(c)]

    def run(self, argv: list[str], *, check: bool = True, input: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run(["nsenter", "-t", str(self.leader), "-a", *argv], capture_output=True, text=True,
                           input=input, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"in {self.name}: {' '.join(argv)} exited {r.returncode}:\n"
                                 f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["/bin/sh", "-c", script], **kw)

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.sh(f"mkdir -p \"$(dirname '{path}')\" && cat > '{path}' && chmod {mode} '{path}'", input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(["systemctl", "show", unit, *(f"-p{p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_unit(self, unit: str, timeout: float = 30.0, **want: str) -> dict[str, str]:
        """Poll `systemctl show` until every property has the wanted value."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.show(unit, *want)
            if all(st.get(k) == v for k, v in want.items()):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {unit} not {want} after {timeout}s: {st}\n"
                                     f"{self.run(['journalctl', '-u', unit, '--no-pager', '-n', '40'], check=False).stdout}")
            time.sleep(0.1)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)   # nspawn turns it into a clean poweroff
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        # nspawn leaves its propagation directory behind when /run is not a tmpfs
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.name}", ignore_errors=True)
        self.proc = None


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""
