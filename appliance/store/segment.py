"""POSIX shared-memory segments (posix_ipc + mmap), and a mapped set of them.

Shared memory outlives processes: nothing here unlinks a segment except
:func:`unlink_all`, which the operator (``appliance destroy``) and tests call
explicitly. posix_ipc, not multiprocessing.shared_memory: the latter registers
attached segments with a resource tracker that unlinks them at exit.

Segment names (``name`` is the appliance name from the config):
``/apl.<name>.meta``, ``/apl.<name>.readers``, ``/apl.<name>.dev<i>``.
Permissions: created with exactly ``mode`` (fchmod, so the umask does not
widen or narrow it) and owned by the configured group; the readers segment
additionally gets group write, because readers record their pins there.
Clients map meta and devices with PROT_READ only.

Memory is reserved when a segment is created (posix_fallocate; tmpfs
allocates every page then), and again when the controller attaches to a
segment with holes: a segment the machine cannot hold fails there, with
:class:`~appliance.errors.MemoryFullError` naming /dev/shm's size, instead
of SIGBUS at the first write to a page tmpfs cannot supply. The controller
attaches only to segments owned by its own user with no wider mode than
configured (:meth:`Segment.open`'s ``expect``), so a local user cannot
prepare a segment for it to adopt.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import stat
from dataclasses import dataclass

import posix_ipc

from .. import errors
from .._native import check, ffi, lib

__all__ = ["Segment", "SegmentNames", "Attachment", "Geometry", "unlink_all", "exists", "shm_huge_pages",
           "huge_pages_status"]


@dataclass(frozen=True)
class SegmentNames:
    name: str
    nsegments: int

    @property
    def meta(self) -> str:
        return f"/apl.{self.name}.meta"

    @property
    def readers(self) -> str:
        return f"/apl.{self.name}.readers"

    def device(self, i: int) -> str:
        return f"/apl.{self.name}.dev{i}"

    def all(self) -> list[str]:
        return [self.meta, self.readers] + [self.device(i) for i in range(self.nsegments)]


class Segment:
    """One mapped POSIX shared-memory segment."""

    __slots__ = ("name", "size", "writable", "_mm", "_ptr")

    def __init__(self, name: str, mm: mmap.mmap, size: int, writable: bool) -> None:
        self.name = name
        self.size = size
        self.writable = writable
        self._mm = mm
        self._ptr = ffi.from_buffer("uint8_t[]", mm)

    @classmethod
    def create(cls, name: str, size: int, mode: int, gid: int | None) -> "Segment":
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=size)
        except posix_ipc.ExistentialError as exc:
            raise errors.BusyError(f"create {name}: a segment of that name already exists",
                                   segment=name) from exc
        try:
            os.fchmod(shm.fd, mode)
            if gid is not None:
                os.fchown(shm.fd, -1, gid)
            _reserve(shm.fd, name, size)
            mm = mmap.mmap(shm.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(name)
            raise
        shm.close_fd()
        return cls(name, mm, size, True)

    @classmethod
    def open(cls, name: str, writable: bool, expect: int | None = None) -> "Segment":
        """Map an existing segment. `expect` (the controller's attach): the
        widest mode the segment may have; it must also belong to this
        process's user, and its memory is reserved (holes filled)."""
        try:
            shm = posix_ipc.SharedMemory(name, read_only=not writable)
        except posix_ipc.ExistentialError as exc:
            raise errors.UnavailableError(f"open {name}: no such segment (is the appliance running?)",
                                          segment=name) from exc
        except posix_ipc.PermissionsError as exc:
            raise errors.AccessDeniedError(f"open {name}: permission denied", segment=name) from exc
        try:
            size = shm.size
            if expect is not None:
                _check_owner(shm.fd, name, expect)
                _reserve(shm.fd, name, size)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(shm.fd, size, mmap.MAP_SHARED, prot)
        finally:
            shm.close_fd()
        return cls(name, mm, size, writable)

    @property
    def ptr(self):
        """``uint8_t *`` to the first byte (valid until close)."""
        return self._ptr

    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        if self._mm is not None:
            ffi.release(self._ptr)
            self._mm.close()
            self._mm = None


SHM_DIR = "/dev/shm"
HUGE_PAGE = 2 << 20
_SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


def shm_huge_pages(mounts: str = "/proc/self/mounts", shmem_enabled: str = _SHMEM_ENABLED) -> str:
    """The huge-page policy segments get: the ``huge=`` option of the tmpfs
    mounted at /dev/shm ("never" without one), unless the kernel's
    shmem_enabled overrides every mount ("deny": never, "force": always).
    With "within_size" or "always" a segment's memory comes in 2 MiB pages
    (posix_fallocate reserves them, each maps with one page-table entry):
    a start, a cold start and a first copy reserve and map 512x fewer pages,
    and a read walks fewer TLB levels. "advise" gives huge pages only to
    pages a mapping with MADV_HUGEPAGE faults in, and a segment's are all
    reserved before it is mapped: none."""
    policy = "never"
    try:
        with open(mounts) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and parts[1] == SHM_DIR:
                    policy = "never"          # the last mount there is the one in effect
                    for opt in parts[3].split(","):
                        if opt.startswith("huge="):
                            policy = opt[5:]
    except OSError:
        return "never"
    try:
        with open(shmem_enabled) as f:
            forced = f.read()
    except OSError:
        forced = ""
    if "[deny]" in forced:
        return "never"
    if "[force]" in forced:
        return "always"
    return policy


def huge_pages_status(devices) -> dict:
    """What status says of huge pages: /dev/shm's policy, and the bytes of
    `devices` (segments) that can be in 2 MiB pages under it."""
    policy = shm_huge_pages()
    total = sum(d.size for d in devices)
    huge = sum(d.size - d.size % HUGE_PAGE for d in devices) if policy in ("always", "within_size") else 0
    return {"dev_shm": policy, "bytes": huge, "of": total}


def _reserve(fd: int, name: str, size: int) -> None:
    """Give every page of the segment its memory now (a no-op for pages it
    has), or raise MemoryFullError saying how much /dev/shm can hold."""
    if os.fstat(fd).st_blocks * 512 >= size:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise
        try:
            vfs = os.statvfs(SHM_DIR)
            room = (f"; {SHM_DIR} holds {_mib(vfs.f_blocks * vfs.f_frsize)} with "
                    f"{_mib(vfs.f_bavail * vfs.f_frsize)} free")
        except OSError:
            room = ""
        raise errors.MemoryFullError(
            f"reserve {name}: shared memory cannot hold its {_mib(size)} ({exc.strerror}){room}; "
            "free memory there, make storage.segment_size or storage.segments smaller, or grow "
            f"{SHM_DIR} (mount -o remount,size=...)", segment=name, size=size) from None


def _check_owner(fd: int, name: str, widest: int) -> None:
    st = os.fstat(fd)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid():
        raise errors.AccessDeniedError(
            f"attach {name}: the segment belongs to uid {st.st_uid}, not to this controller's user "
            f"(uid {os.geteuid()}); refusing a segment someone else made. Remove it if it is not the "
            "appliance's data", segment=name, owner=st.st_uid)
    if mode & ~widest:
        raise errors.AccessDeniedError(
            f"attach {name}: the segment has mode {mode:04o}, wider than the configured "
            f"{widest:04o} (storage.mode); refusing it. chmod it back if it is the appliance's data",
            segment=name, mode=f"{mode:04o}")


def _mib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def readers_mode(mode: int) -> int:
    """The readers segment's mode: readers record their pins there, so whoever
    may read (the group) must be able to write."""
    return mode | (0o020 if mode & 0o040 else 0)


def exists(name: str) -> bool:
    try:
        posix_ipc.SharedMemory(name).close_fd()
        return True
    except posix_ipc.PermissionsError:
        return True
    except posix_ipc.ExistentialError:
        return False


def unlink_all(appliance_name: str, nsegments: int | None = None) -> list[str]:
    """Unlink every segment of an appliance; returns the names removed."""
    names = SegmentNames(appliance_name, nsegments or 0)
    candidates = [names.meta, names.readers]
    i = 0
    while True:
        dev = names.device(i)
        if nsegments is not None and i >= nsegments:
            break
        if nsegments is None and not exists(dev) and i >= 64:
            break
        candidates.append(dev)
        i += 1
    candidates.append(f"/apl.{appliance_name}.lock")  # the controller lock (appliance.controller)
    removed = []
    for n in candidates:
        try:
            posix_ipc.unlink_shared_memory(n)
            removed.append(n)
        except posix_ipc.ExistentialError:
            pass
    return removed


class Geometry:
    """Sizes of every segment for a configuration (computed by the C helpers)."""

    def __init__(self, *, block_size: int, nsegments: int, segment_size: int, nfiles: int,
                 max_overflow: int, nreaders: int, log_size: int, compressed: bool = False,
                 max_blocks: int = 0, layout_len: int = 0) -> None:
        g = ffi.new("struct apl_geometry *")
        g.block_size = block_size
        g.nsegments = nsegments
        g.segment_size = segment_size
        g.nfiles = nfiles
        g.max_overflow = max_overflow
        g.nreaders = nreaders
        g.log_size = log_size
        g.compressed = 1 if compressed else 0
        g.max_blocks_in = max_blocks
        g.layout_len = layout_len
        check(lib.apl_geometry(g), "geometry")
        self.c = g

    def __getattr__(self, item):
        return getattr(self.c, item)


class Attachment:
    """A mapped set of an appliance's segments and the C view over them.

    ``writable=False`` (clients, the agent): meta and devices read-only, the
    readers segment read-write. ``writable=True``: the controller, which
    passes the configured ``mode``: every segment must be its own and no
    wider (see :meth:`Segment.open`).
    """

    def __init__(self, appliance_name: str, *, writable: bool, segments: list[Segment] | None = None,
                 meta: Segment | None = None, readers: Segment | None = None,
                 mode: int | None = None) -> None:
        self._closed = True   # until the view is open (__del__ then does nothing)
        self.name = appliance_name
        self.writable = writable
        self._segs: list[Segment] = []
        try:
            self.meta = meta or Segment.open(SegmentNames(appliance_name, 0).meta, writable, mode)
            self._segs.append(self.meta)
            rc = lib.apl_check_meta(self.meta.ptr, self.meta.size)
            check(rc, f"attach {self.meta.name}", segment=self.meta.name)
            self.sb = ffi.cast("struct apl_super *", self.meta.ptr)
            nseg = self.sb.sb_nsegments
            self.names = SegmentNames(appliance_name, nseg)
            self.readers = readers or Segment.open(self.names.readers, True,
                                                   None if mode is None else readers_mode(mode))
            self._segs.append(self.readers)
            self.devices = segments or []
            for i in range(0 if segments else nseg):
                self.devices.append(Segment.open(self.names.device(i), writable, mode))
                self._segs.append(self.devices[-1])
            if segments:
                self._segs.extend(self.devices)
            self._dev_ptrs = ffi.new("uint8_t *[]", [d.ptr for d in self.devices])
            self.view = ffi.new("apl_view *")
            seg_size = min(d.size for d in self.devices)
            self.compressed = bool(self.sb.sb_flags & lib.APL_SB_COMPRESSED)
            check(lib.apl_view_open(self.view, self.meta.ptr, self.meta.size, self.readers.ptr,
                                    self.readers.size, self._dev_ptrs, nseg, seg_size),
                  f"attach appliance {appliance_name!r}")
        except BaseException:
            self._closed = True
            for s in self._segs:
                s.close()
            raise
        self.instance = self.sb.sb_instance
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def layout(self) -> dict | None:
        """The layout description recorded when the segments were formatted
        (Config.layout()), or None when there is none (an older format)."""
        sb = self.sb
        if not sb.sb_layout_len:
            return None
        raw = bytes(ffi.buffer(self.meta.ptr + sb.sb_layout_off, sb.sb_layout_len))
        try:
            doc = json.loads(raw)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        lib.apl_view_close(self.view)   # before the mappings go: the C side forgets them first
        for s in self._segs:
            s.close()

    def __del__(self):
        # An attachment dropped without close(): its mmaps are about to be
        # unmapped, so the C view (registered process-wide, with per-thread
        # cached reader slots inside the readers segment) must forget them now.
        try:
            self.close()
        except Exception:
            pass
