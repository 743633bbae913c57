"""The only FFIBuilder of the project: builds ``appliance._cext`` from cext/*.c.

API out-of-line mode (``set_source`` + ``cffi_modules`` in setup.py). The cdef
is generated from cext/apl.h and the headers it includes (see "The cdef,
generated from the headers" below) and leaves every value and struct layout to
the compiler (``...``), so Python reads sizes and offsets from the C headers
and cannot drift from them.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def _lz4_flags() -> tuple[list[str], list[str]]:
    """Include and library directories of liblz4, from pkg-config when it knows
    the library; otherwise the compiler's defaults (/usr/include on Debian)."""
    if shutil.which("pkg-config"):
        r = subprocess.run(["pkg-config", "--cflags-only-I", "--libs-only-L", "liblz4"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            words = r.stdout.split()
            return [w[2:] for w in words if w.startswith("-I")], [w[2:] for w in words if w.startswith("-L")]
    if not any(os.path.exists(os.path.join(d, "lz4.h")) for d in ("/usr/include", "/usr/local/include")):
        print("appliance: lz4.h not found: install the lz4 development files "
              "(Debian/Ubuntu: apt-get install liblz4-dev; Fedora: dnf install lz4-devel)", file=sys.stderr)
    return [], []


LZ4_INCLUDE, LZ4_LIBDIRS = _lz4_flags()
#: every C file of cext/ is compiled: a new one needs no edit here
SOURCES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(HERE, "*.c")))


# ---------------------------------------------------------------------------
# The cdef, generated from the headers
# ---------------------------------------------------------------------------
#
# Python sees exactly what apl.h (and the headers it includes) declares: the
# cdef is generated from them at build time, so a prototype, constant, enum
# or struct field added to a header reaches Python with no other edit, and no
# second copy exists to drift. Generating is sound here because the public
# headers are kept to a small subset of C that maps one to one onto a cdef:
#   - object-like integer macros  -> "#define NAME ..."   (value: the compiler's)
#   - enums                       -> names only, then "..." (values: the compiler's)
#   - X-macro lists (APL_ERRORS)  -> expanded to the names they declare
#   - structs                     -> every field, array sizes that are not
#                                    literals as [...], then "...;" (layout: the compiler's)
#   - typedefs and prototypes     -> as written
#   - _Static_assert, function-like macros, static inline functions, include
#     guards, #include <...>      -> nothing Python can use; left out
# Anything else (#ifdef, variables, string macros, a non-static function
# body) stops the build with a CdefError naming file and line, so nothing is
# ever dropped silently. Every value, size and offset is still left to the
# compiler ("..."): Python reads them from the C headers, never from here.
# tests/test_layout.py checks the built module against the headers.


class CdefError(Exception):
    """A header construct the cdef generator does not translate."""


def _logical_lines(path: str) -> list[tuple[int, str]]:
    """(line number, text) of each logical line: comments replaced by blanks
    (their newlines kept, so numbers stay right), continued lines joined."""
    text = open(path).read()
    text = re.sub(r"/\*.*?\*/|//[^\n]*", lambda m: " " + "\n" * m[0].count("\n"), text, flags=re.S)
    out, buf, start = [], "", 0
    for i, line in enumerate(text.split("\n"), 1):
        if not buf:
            start = i
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    return out


def _statements(chunks: list[tuple[int, str]]):
    """Split declaration text into top-level statements: (line, text) each,
    ending at a ';' outside braces or at the '}' that closes a function body."""
    depth, buf, start = 0, [], None
    for lineno, line in chunks:
        for ch in line + "\n":
            if start is None and not ch.isspace():
                start = lineno
            buf.append(ch)
            if ch in "{(":
                depth += 1
            elif ch in "})":
                depth -= 1
                if ch == "}" and depth == 0:
                    head = "".join(buf).split("{", 1)[0].strip()
                    if head.endswith(")"):  # a function definition: no ';' follows
                        yield start, " ".join("".join(buf).split())
                        buf, start = [], None
            elif ch == ";" and depth == 0:
                yield start, " ".join("".join(buf).split())
                buf, start = [], None
    if "".join(buf).strip():
        raise CdefError(f"unterminated declaration at line {start}")


def _fields(body: str, where: str) -> str:
    out = []
    for decl in body.split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        if "{" in decl or "(" in decl:
            raise CdefError(f"{where}: nested struct, union or function pointer field: {decl}")
        out.append(re.sub(r"\[([^\]]*)\]", lambda m: m[0] if m[1].strip().isdigit() else "[...]", decl) + ";")
    return " ".join(out + ["...;"])


def _enumerators(body: str, xmacros: dict[str, list[str]], where: str) -> list[str]:
    names = []
    for item in body.split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"(\w+)\s*\(\s*\w+\s*\)", item)
        if m and m[1] in xmacros:
            names += xmacros[m[1]]
        elif re.fullmatch(r"\w+(\s*=.*)?", item, flags=re.S):
            names.append(item.split("=")[0].strip())
        else:
            raise CdefError(f"{where}: enumerator not understood: {item}")
    return names


def _declaration(stmt: str, xmacros: dict[str, list[str]], where: str) -> str | None:
    """The cdef text for one top-level statement (None: nothing for Python)."""
    if stmt.startswith("_Static_assert") or stmt.startswith("static "):
        return None
    if "{" in stmt:
        m = re.fullmatch(r"((?:typedef )?(?:struct|union) \w+) ?\{(.*)\} ?(\w*) ?;", stmt, flags=re.S)
        if m:
            return f"{m[1]} {{ {_fields(m[2], where)} }}{' ' + m[3] if m[3] else ''};"
        m = re.fullmatch(r"((?:typedef )?enum \w+) ?\{(.*)\} ?(\w*) ?;", stmt, flags=re.S)
        if m:
            names = _enumerators(m[2], xmacros, where)
            return f"{m[1]} {{ {', '.join(names + ['...'])} }}{' ' + m[3] if m[3] else ''};"
        raise CdefError(f"{where}: a definition Python cannot use from a header: {stmt[:80]}")
    if stmt.startswith("typedef ") or re.fullmatch(r"(struct|union) \w+ ?;", stmt):
        return stmt
    if re.fullmatch(r"(?:const )?(?:struct |enum )?\w+[ *]+\w+ ?\(.*\) ?;", stmt, flags=re.S) and "=" not in stmt:
        return stmt
    raise CdefError(f"{where}: declaration not understood (only prototypes, typedefs, structs "
                    f"and enums may be in a public header): {stmt[:80]}")


def cdef_from_headers(header) -> str:
    """The cdef for `header` and the headers it includes ("..."): the
    constants, then the declarations in the order the compiler reads them."""
    out: list[str] = []
    defines: list[str] = []
    xmacros: dict[str, list[str]] = {}
    done: set[str] = set()

    def translate(path: str) -> None:
        path = os.path.abspath(path)
        if path in done:
            return
        done.add(path)
        name = os.path.basename(path)
        decls: list[tuple[int, str]] = []
        guard = None
        depth = 0

        def flush() -> None:
            for lineno, stmt in _statements(decls):
                d = _declaration(stmt, xmacros, f"{name}:{lineno}")
                if d:
                    out.append(d)
            decls.clear()

        for lineno, line in _logical_lines(path):
            where = f"{name}:{lineno}"
            m = re.match(r"\s*#\s*(\w*)\s*(.*?)\s*$", line)
            if not m:
                decls.append((lineno, line))
                continue
            word, rest = m[1], m[2]
            if guard is not None and not (word == "define" and rest == guard):
                raise CdefError(f"{where}: only an include guard (#ifndef X / #define X) may be conditional")
            if word == "ifndef" and depth == 0:
                guard, depth = rest, 1
            elif word == "define" and rest == guard:
                guard = None
            elif word == "endif" and depth == 1:
                depth = 0
            elif word == "include":
                flush()
                inc = re.fullmatch(r'"([^"]+)"', rest)
                if inc:
                    translate(os.path.join(os.path.dirname(path), inc[1]))
            elif word == "define":
                d = re.match(r"(\w+)(\()?", rest)
                if d[2]:  # function-like: an X-macro list declares names, anything else nothing
                    params = re.match(r"\w+\(\s*(\w+)\s*\)\s*(.*)", rest)
                    if params:
                        xmacros[d[1]] = re.findall(rf"\b{re.escape(params[1])}\(\s*(\w+)", params[2])
                    continue
                value = rest[len(d[1]):].strip()
                if value.startswith(("\"", "'")):
                    raise CdefError(f"{where}: {d[1]} is not an integer constant (a cdef has no other kind)")
                if value:
                    defines.append(f"#define {d[1]} ...")
            elif word in ("undef", "pragma"):
                continue
            else:
                raise CdefError(f"{where}: #{word} in a public header (only include guards may be conditional)")
        flush()

    translate(str(header))
    return "\n".join(defines + out) + "\n"


CDEF = cdef_from_headers(os.path.join(HERE, "apl.h"))

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "appliance._cext",
    '#include "apl.h"',
    sources=[os.path.relpath(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(HERE), *LZ4_INCLUDE],
    library_dirs=LZ4_LIBDIRS,
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-sign-compare", "-fno-strict-aliasing"],
    # liblz4, built against its own header (Debian: liblz4-dev) and linked
    # the ordinary way; the set-up commands install it
    libraries=["lz4", "pthread"],
    # apl_py.c defines CPython types with the full C API (METH_FASTCALL
    # methods that build dicts directly), so the module is built for this
    # Python version rather than the stable ABI
    py_limited_api=False,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
