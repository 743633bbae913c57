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


# ---------------------------------------------------------------------------
# The cffi declarations follow the headers (cext/build.py generates them)
# ---------------------------------------------------------------------------

CEXT = LAYOUT_H.parent
#: the headers Python sees: apl.h and what it includes
PUBLIC_HEADERS = ("apl.h", "apl_layout.h", "apl_errors.h")


def _load_build():
    """cext/build.py as a module (it is run by setuptools, not imported by the package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("apl_build", CEXT / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def header_text(name: str) -> str:
    """A header as the compiler reads it: continuation lines joined, comments gone."""
    text = (CEXT / name).read_text().replace("\\\n", " ")
    return re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S)


def header_prototypes(name: str) -> dict[str, tuple[str, list[str]]]:
    """apl_* function -> (return type, parameter types) as the header declares them."""
    out = {}
    text = "\n".join(line for line in header_text(name).splitlines() if not line.lstrip().startswith("#"))
    for m in re.finditer(r"^[ \t]*((?:const\s+)?(?:struct\s+)?\w+[\s*]+)(apl_\w+)\s*\(([^;{]*?)\)\s*;", text, re.M):
        params = [p.strip() for p in m[3].split(",")]
        types = [] if params == ["void"] else [re.fullmatch(r"(.*?[\s*])\w+", p)[1].strip() for p in params]
        out[m[2]] = (m[1].strip(), types)
    return out


def header_constants(name: str) -> dict[str, int | None]:
    """Every APL_* object-like macro and enumerator -> its value when it is a literal, else None."""
    text = header_text(name)
    out: dict[str, int | None] = {}

    def literal(v: str) -> int | None:
        v = v.strip()
        m = re.fullmatch(r"(-?)(0[xX][0-9A-Fa-f]+|\d+)[uUlL]*", v)
        return int(m[1] + m[2], 0) if m else None

    for m in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(APL_\w+)[ \t]+(\S[^\n]*)$", text, re.M):
        if m[1] == "APL_ERRORS":  # the X-macro list: its entries are the enumerators of enum apl_error
            for e in re.finditer(r"\b_\(\s*(APL_\w+)\s*,\s*(-?\d+)", m[2]):
                out[e[1]] = int(e[2])
        else:
            out[m[1]] = literal(m[2])
    for m in re.finditer(r"\benum\s+\w+\s*\{([^}]*)\}", text):
        body = " ".join(line for line in m[1].splitlines() if not line.lstrip().startswith("#"))
        for e in re.finditer(r"\b(APL_\w+)\s*(?:=\s*([^,]+))?(?:,|$)", body.strip()):
            out[e[1]] = literal(e[2]) if e[2] else None
    return out


def header_structs(name: str) -> dict[str, list[str]]:
    """struct -> its field names in order, as the header declares them."""
    out = {}
    for m in re.finditer(r"\bstruct\s+(\w+)\s*\{([^}]*)\}", header_text(name)):
        fields = []
        for decl in m[2].split(";"):
            if decl.strip():
                fields += [re.search(r"(\w+)\s*(?:\[[^\]]*\])?\s*$", d)[1] for d in decl.split(",")]
        out[m[1]] = fields
    return out


class TestCdefFollowsHeaders:
    """Whatever the headers declare, Python sees: same functions with the same
    signatures, every constant with its value, every struct with all its fields."""

    @pytest.mark.parametrize("header", PUBLIC_HEADERS)
    def test_every_function_with_its_signature(self, header):
        protos = header_prototypes(header)
        assert header != "apl.h" or len(protos) > 50
        for name, (ret, params) in sorted(protos.items()):
            assert hasattr(lib, name), f"{header}: {name} is not in the cffi module"
            want = ffi.typeof(f"{ret}(*)({', '.join(params) or 'void'})")
            assert ffi.typeof(getattr(lib, name)) == want, f"{header}: {name}"

    @pytest.mark.parametrize("header", PUBLIC_HEADERS)
    def test_every_constant_with_its_value(self, header):
        consts = header_constants(header)
        assert consts
        missing = sorted(n for n in consts if not hasattr(lib, n))
        assert not missing, f"{header}: not in the cffi module: {missing}"
        wrong = {n: (getattr(lib, n), v) for n, v in consts.items() if v is not None and getattr(lib, n) != v}
        assert not wrong, f"{header}: cffi value != header value: {wrong}"

    @pytest.mark.parametrize("header", PUBLIC_HEADERS)
    def test_every_struct_with_all_its_fields(self, header):
        for struct, fields in header_structs(header).items():
            seen = [n for n, _ in ffi.typeof(f"struct {struct}").fields]
            assert seen == fields, f"{header}: struct {struct}"

    def test_the_cffi_module_builds_every_c_source(self):
        """A new cext/*.c file (a CPython type module, say) is compiled without editing build.py."""
        build = _load_build()
        assert sorted(build.SOURCES) == sorted(p.name for p in CEXT.glob("*.c"))

    def test_a_header_addition_flows_into_the_cdef(self, tmp_path):
        """A prototype, constant and field added to a header reach the cdef with no other edit."""
        build = _load_build()
        for h in CEXT.glob("*.h"):
            (tmp_path / h.name).write_text(h.read_text())
        apl_h = tmp_path / "apl.h"
        apl_h.write_text(apl_h.read_text().replace(
            "#endif", "#define APL_EXAMPLE_FLAG 4u\nint apl_example_install(const char *module);\n"
            "struct apl_example_info {\n    uint32_t pi_types;   /* types installed */\n    uint64_t pi_seen[APL_MAX_FILES];\n};\n#endif"))
        cdef = build.cdef_from_headers(apl_h)
        assert "int apl_example_install(const char *module);" in cdef
        assert "#define APL_EXAMPLE_FLAG ..." in cdef
        assert re.search(r"struct apl_example_info \{\s*uint32_t pi_types;\s*uint64_t pi_seen\[\.\.\.\];\s*\.\.\.;\s*\};", cdef)
        from cffi import FFI
        FFI().cdef(cdef)  # cffi accepts it as it is

    @pytest.mark.parametrize("bad, what", [
        ("#ifdef APL_SOMETHING\nint apl_x(void);\n#endif\n", "#ifdef"),
        ("extern int apl_counter;\n", "apl_counter"),
        ('#define APL_NAME "x"\n', "APL_NAME"),
    ])
    def test_what_it_cannot_translate_stops_the_build(self, tmp_path, bad, what):
        """A header construct the generator does not know is an error naming the file and line, never dropped."""
        build = _load_build()
        for h in CEXT.glob("*.h"):
            (tmp_path / h.name).write_text(h.read_text())
        apl_h = tmp_path / "apl.h"
        text = apl_h.read_text()
        apl_h.write_text(text.replace("#endif", bad + "#endif"))
        with pytest.raises(build.CdefError) as exc:
            build.cdef_from_headers(apl_h)
        assert "apl.h:" in str(exc.value) and what in str(exc.value)
