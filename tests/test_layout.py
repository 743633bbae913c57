"""C and Python agree on the on-memory format (cext/apl_layout.h), in the
manner of py-lmdb's layout tests: struct sizes and hot offsets, the format
number that folds them in, and that number as stored in every segment."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import errors
from appliance._native import ffi, lib
from appliance.store.segment import Attachment

LAYOUT_H = Path(__file__).resolve().parent.parent / "cext" / "apl_layout.h"
CACHELINE = 64

#: struct -> size, as the _Static_asserts of cext/apl_layout.h fix them
SIZES = {"apl_super": 448, "apl_file": 128, "apl_reader": 64, "apl_bhdr": 64, "apl_slot": 16,
         "apl_centry": 72, "apl_pub": 64, "apl_rhdr": 64, "apl_bobj": 48, "apl_rown": 16}


def static_assert_sizes() -> dict[str, int]:
    """struct -> size from the header's `_Static_assert(sizeof(struct X) == EXPR, ...)` lines."""
    text = LAYOUT_H.read_text()
    consts = {"APL_CACHELINE": str(CACHELINE)}
    out = {}
    for m in re.finditer(r"_Static_assert\(sizeof\(struct (\w+)\) == ([^,]+),", text):
        expr = m[2]
        for name, value in consts.items():
            expr = expr.replace(name, value)
        assert re.fullmatch(r"[\d\s+*]+", expr), expr
        out[m[1]] = eval(expr)  # digits, spaces, + and * only
    return out


def format_number_from_sizes() -> int:
    """APL_FORMAT as the header defines it, recomputed from the sizes cffi reports."""
    s = ffi.sizeof
    v = (lib.APL_FORMAT_VERSION * 1000003
         ^ s("struct apl_super") * 31 ^ s("struct apl_file") * 37 ^ s("struct apl_reader") * 41
         ^ s("struct apl_bhdr") * 43 ^ s("struct apl_slot") * 47 ^ s("struct apl_centry") * 53
         ^ s("struct apl_bobj") * 61 ^ lib.APL_BCLASSES * 67
         ^ s("struct apl_rown") * 71 ^ s("uint64_t") * 59)
    return v & 0xFFFFFFFF


@pytest.fixture
def attached(bank):
    """A read-only attachment to a running appliance's segments."""
    att = Attachment(bank.name, writable=False)
    yield att
    att.close()


class TestStructSizes:
    @pytest.mark.parametrize("struct, size", sorted(SIZES.items()))
    def test_sizeof(self, struct, size):
        """ffi.sizeof of each shared struct is the size the header's static asserts fix."""
        assert ffi.sizeof(f"struct {struct}") == size

    def test_static_asserts_are_the_expected_sizes(self):
        """The header's static asserts state exactly the sizes these tests pin."""
        assert static_assert_sizes() == SIZES

    def test_hot_superblock_fields_start_a_cache_line(self):
        """sb_version opens the controller-written cache line at 256; the publication records follow at 320."""
        assert ffi.offsetof("struct apl_super", "sb_version") == 256
        assert ffi.offsetof("struct apl_super", "sb_epoch") == 264
        assert ffi.offsetof("struct apl_super", "sb_pub") == 320
        assert ffi.offsetof("struct apl_super", "sb_format") == 4 and ffi.offsetof("struct apl_super", "sb_magic") == 0

    def test_reader_slot_is_one_cache_line(self):
        """A reader slot and the readers header are each exactly one cache line, pin at a fixed offset."""
        assert ffi.sizeof("struct apl_reader") == CACHELINE
        assert ffi.sizeof("struct apl_rhdr") == CACHELINE
        assert ffi.offsetof("struct apl_reader", "rs_pin") == 8

    def test_change_log_entry_fields(self):
        """The change-log entry header keeps its field offsets (the replication agent parses them)."""
        off = lambda f: ffi.offsetof("struct apl_centry", f)
        assert [off(f) for f in ("ce_len", "ce_kind", "ce_flags", "ce_file", "ce_block", "ce_serial", "ce_txn",
                                 "ce_epoch", "ce_time_ns", "ce_version", "ce_offset", "ce_klen", "ce_alen",
                                 "ce_blen")] == [0, 4, 6, 8, 12, 16, 24, 32, 40, 48, 56, 60, 64, 68]


class TestFormatNumber:
    def test_stable_within_a_build(self):
        """apl_format_number() is the same on every call and in another process of the same build."""
        here = lib.apl_format_number()
        assert here == lib.apl_format_number()
        out = subprocess.run([sys.executable, "-c", "from appliance._native import lib; print(lib.apl_format_number())"],
                             capture_output=True, text=True, check=True).stdout
        assert int(out) == here

    def test_folds_in_the_struct_sizes(self):
        """apl_format_number() equals the header's formula applied to the sizes cffi sees."""
        assert lib.apl_format_number() == format_number_from_sizes()

    def test_stored_in_every_segment(self, attached):
        """The meta, readers and every device segment carry this build's format number."""
        fmt = lib.apl_format_number()
        assert attached.sb.sb_magic == lib.APL_MAGIC_META and attached.sb.sb_format == fmt
        rh = ffi.cast("struct apl_rhdr *", attached.readers.ptr)
        assert rh.rh_format == fmt and rh.rh_instance == attached.sb.sb_instance
        for i, dev in enumerate(attached.devices):
            sg = ffi.cast("struct apl_seghdr *", dev.ptr)
            assert (sg.sg_format, sg.sg_index, sg.sg_instance) == (fmt, i, attached.sb.sb_instance)

    def test_reader_slots_fit_the_readers_segment(self, attached):
        """The readers segment holds its header plus rh_nslots cache-line slots."""
        rh = ffi.cast("struct apl_rhdr *", attached.readers.ptr)
        assert rh.rh_nslots == attached.sb.sb_nreaders
        assert attached.readers.size >= ffi.sizeof("struct apl_rhdr") + rh.rh_nslots * CACHELINE

    def test_another_format_is_refused(self, attached):
        """A meta or readers segment with another format number is refused (APL_EVERSION -> FormatError)."""
        meta = bytearray(ffi.buffer(attached.meta.ptr, attached.meta.size))
        cmeta = ffi.from_buffer("uint8_t[]", meta)
        assert lib.apl_check_meta(cmeta, len(meta)) == 0
        ffi.cast("struct apl_super *", cmeta).sb_format ^= 1
        rc = lib.apl_check_meta(cmeta, len(meta))
        assert rc == lib.APL_EVERSION
        assert errors.class_for("APL_EVERSION") is errors.FormatError
        ffi.cast("struct apl_super *", cmeta).sb_magic ^= 1
        assert lib.apl_check_meta(cmeta, len(meta)) == lib.APL_EMAGIC

        readers = bytearray(ffi.buffer(attached.readers.ptr, attached.readers.size))
        creaders = ffi.from_buffer("uint8_t[]", readers)
        inst = attached.sb.sb_instance
        assert lib.apl_check_readers(creaders, len(readers), inst) == 0
        ffi.cast("struct apl_rhdr *", creaders).rh_format += 1
        assert lib.apl_check_readers(creaders, len(readers), inst) == lib.APL_EVERSION
