"""Open the appliance's segments, or create them: what a controller does first.

Shared memory outlives the controller: a restarted controller re-attaches to
the segments its predecessor left and recovers (rolls back the batch a crash
interrupted, rebuilds free lists), so it serves again within a second. It
refuses segments made for another layout rather than reinterpret them.
Without segments but with a durability directory that holds data (a reboot,
a power cut), it makes them anew from the files: the cold start
(appliance/durability/coldstart.py).
"""
from __future__ import annotations

import json
import os

from .. import errors
from .._native import lib
from ..config import Config, layout_differences
from ..store.segment import SHM_DIR, Attachment, Geometry, SegmentNames, exists, unlink_all
from ..store.writer import FileSpec, Writer

__all__ = ["open_or_create", "create", "geometry", "file_specs"]


def geometry(cfg: Config, layout_len: int = 0, compressed: bool | None = None) -> Geometry:
    s = cfg.storage
    compressed = cfg.compressed if compressed is None else compressed
    max_blocks = s.max_blocks or (s.segments * s.segment_size // s.block_size * 4 if compressed else 0)
    return Geometry(block_size=s.block_size, nsegments=s.segments, segment_size=s.segment_size,
                    nfiles=len(cfg.files()), max_overflow=s.max_overflow, nreaders=s.max_readers,
                    log_size=s.log_size, compressed=compressed, max_blocks=max_blocks, layout_len=layout_len)


def file_specs(cfg: Config) -> list[FileSpec]:
    ids = {name: i for i, (name, _t, _f) in enumerate(cfg.files())}
    out = []
    for name, table, field in cfg.files():
        if field is None:
            out.append(FileSpec(name, lib.APL_FILE_PRIMARY, ids[name]))
        else:
            out.append(FileSpec(name, lib.APL_FILE_ALTKEY, ids[table]))
    return out


def open_or_create(cfg: Config, log, files=None) -> tuple[Writer, dict, bool]:
    """(writer, recovery facts, created). `files`: the durability directory
    (durability.LogDir), when the appliance has one."""
    s = cfg.storage
    names = SegmentNames(cfg.name, s.segments)
    reserve = cfg.controller.reserve_blocks
    if exists(names.meta):
        att = Attachment(cfg.name, writable=True, mode=s.mode_bits)
        sb = att.sb
        if sb.sb_version == 0:
            # a create that never finished: nothing was ever committed
            att.close()
            unlink_all(cfg.name, s.segments)
            log.warning("segments_incomplete_recreated", appliance=cfg.name)
        # (an lz4 secondary that was promoted holds primary blocks: its segments say so)
        elif sb.sb_schema_hash != cfg.schema_hash(compressed=att.compressed) or sb.sb_nsegments != s.segments:
            differ = _differences(att, cfg)
            att.close()
            raise errors.FormatError(
                f"{cfg.path}: appliance {cfg.name!r} already exists in shared memory with a different "
                f"layout ({differ}). Restore the previous configuration, or delete its data with "
                f"`appliance destroy --config {cfg.path}`.", appliance=cfg.name)
        else:
            w = Writer(att, reserve)
            facts = w.recover()
            return w, facts, False
    else:
        leftovers = [n for n in names.all() if exists(n)]
        if leftovers:
            for n in leftovers:
                _check_leftover(n)
            unlink_all(cfg.name, s.segments)
            log.warning("orphan_segments_removed", segments=leftovers)
    if files is not None and files.has_data():
        from ..durability.coldstart import cold_start
        w, facts = cold_start(cfg, log, files)
        return w, facts, False
    return create(cfg), {}, True


def create(cfg: Config, instance: int | None = None) -> Writer:
    """New segments for `cfg`, formatted, its files made (version 1).
    `instance`: the identity to give them (a cold start keeps the files')."""
    s = cfg.storage
    layout = json.dumps(cfg.layout(), sort_keys=True).encode()
    return Writer.create(cfg.name, geometry(cfg, len(layout)), mode=s.mode_bits, gid=cfg.gid(),
                         schema_hash=cfg.schema_hash(), files=file_specs(cfg),
                         reserve_slots=cfg.controller.reserve_blocks, layout=layout, instance=instance)


def _differences(att: Attachment, cfg: Config) -> str:
    """What differs between the segments and the configuration, by setting."""
    recorded = att.layout()
    if recorded is not None:
        lines = layout_differences(recorded, cfg.layout())
        if lines:
            return "; ".join(lines)
    sb = att.sb
    lines = [f"storage.{k}: {a} in shared memory, {b} in the config" for k, a, b in (
        ("block_size", sb.sb_block_size, cfg.storage.block_size),
        ("segments", sb.sb_nsegments, cfg.storage.segments),
        ("max_overflow", sb.sb_max_overflow, cfg.storage.max_overflow),
        ("max_readers", sb.sb_nreaders, cfg.storage.max_readers),
        ("log_size", sb.sb_log_size, cfg.storage.log_size)) if a != b]
    return "; ".join(lines) or "tables or storage settings changed; the segments do not record which"


def _check_leftover(name: str) -> None:
    """Segments of this appliance without its meta: removed and made anew,
    unless another user made them (then it is not ours to remove)."""
    try:
        st = os.stat(SHM_DIR + name)
    except FileNotFoundError:
        return
    if st.st_uid != os.geteuid():
        raise errors.AccessDeniedError(
            f"segment {name} exists without the appliance's meta segment and belongs to uid {st.st_uid}, "
            f"not to this controller's user (uid {os.geteuid()}); refusing to use or remove it",
            segment=name, owner=st.st_uid)
