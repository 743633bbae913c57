"""Map the device segments' pages into the controller ahead of use.

A segment's memory is reserved when it is made, but each page still costs a
fault the first time the controller writes it — on a VM several
microseconds a page, paid by whatever write comes first: a commit's new
block, or a first copy pouring a whole store into an empty secondary (there
the faults were most of the copy's time). :class:`Prefault` pays them at
start instead, in a background thread (``storage.prefault``, on by
default), a chunk at a time, the devices in turn (the allocator takes slots
from each device in turn, lowest first).

Shared: the device segments' pages (the controller's main thread writes
them meanwhile; apl_prefault only maps pages and never writes one: see
cext/apl_prefault.c) and this object's counters (the thread writes them,
status() reads them: ints, read whole under the GIL). The thread stops at
the next chunk once :meth:`stop` is called, and the controller calls it
before it unmaps the segments.
"""
from __future__ import annotations

import threading
import time

from .._native import lib

__all__ = ["Prefault"]

CHUNK = 8 << 20   # bytes mapped per call: a stop waits for one chunk at most


class Prefault:
    def __init__(self, devices: list, log) -> None:
        self.devices = list(devices)
        self.log = log
        self.total = sum(d.size for d in self.devices)
        self.done_bytes = 0
        self.seconds: float | None = None   # set once every page is mapped
        self.method = "populate"            # or "read": the kernel lacks MADV_POPULATE_WRITE
        self.huge_bytes: int | None = None  # once done: shared memory this process maps in 2 MiB pages
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Prefault":
        self._thread = threading.Thread(target=self._run, name="appliance-prefault", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def status(self) -> dict:
        return {"bytes": self.done_bytes, "total": self.total, "done": self.seconds is not None,
                "seconds": self.seconds, "huge_bytes": self.huge_bytes}

    def _run(self) -> None:
        t0 = time.monotonic()
        off = 0
        end = max((d.size for d in self.devices), default=0)
        try:
            while off < end:
                for dev in self.devices:
                    if self._stop.is_set() or dev.closed:
                        return
                    n = min(CHUNK, dev.size - off)
                    if n <= 0:
                        continue
                    rc = lib.apl_prefault(dev.ptr + off, n)
                    if rc < 0:
                        self.log.warning("prefault_stopped", segment=dev.name, offset=off, code=rc)
                        return
                    if rc == 1:
                        self.method = "read"
                    self.done_bytes += n
                off += CHUNK
            self.huge_bytes = _pmd_mapped()
            self.seconds = round(time.monotonic() - t0, 3)
            self.log.info("prefault_done", bytes=self.done_bytes, seconds=self.seconds, method=self.method,
                          huge_bytes=self.huge_bytes)
        except Exception as exc:  # noqa: BLE001 - a helper thread: the controller serves on without it
            self.log.warning("prefault_stopped", error=f"{type(exc).__name__}: {exc}")


def _pmd_mapped() -> int | None:
    """Bytes of shared memory this process maps in 2 MiB pages (smaps_rollup
    ShmemPmdMapped: the segments' pages as they really are, whatever the
    policy now says). Read once, here: the kernel walks every page table
    of the process for it (~40 ms for 2 GiB of 4 KiB pages)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("ShmemPmdMapped:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
