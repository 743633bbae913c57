"""The C helpers' code layout (cext/): each file says what it owns, the
README's code-layout paragraph names every file, a function used across
files is declared once in a header, and only the public API (apl.h) is
exported from the compiled module."""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from appliance import _cext

ROOT = Path(__file__).resolve().parent.parent
CEXT = ROOT / "cext"
C_FILES = sorted(p.name for p in CEXT.glob("*.c"))
FILES = sorted(p.name for p in CEXT.glob("*.[ch]"))
PUBLIC = ("apl.h", "apl_errors.h", "apl_layout.h")
INTERNAL = ("apl_int.h", "apl_store_int.h")


def code(name: str) -> str:
    """A C file without comments (each replaced by its newlines), continued lines joined."""
    text = (CEXT / name).read_text().replace("\\\n", " ")
    return re.sub(r"/\*.*?\*/|//[^\n]*", lambda m: " " + "\n" * m[0].count("\n"), text, flags=re.S)


def definitions(name: str) -> dict[str, bool]:
    """Function -> static?, for every function a .c file defines (a definition starts in column 0)."""
    return {m[2]: bool(m[1]) for m in re.finditer(
        r"^(static\s+)?(?:inline\s+)?[A-Za-z_][\w \t*]*?\b(\w+)\s*\([^;{]*?\)\s*\{", code(name), re.M)}


def prototypes(name: str) -> set[str]:
    """Functions a file declares without defining (non-static prototypes)."""
    return {m[1] for m in re.finditer(r"^(?!static\b)(?!typedef\b)[A-Za-z_][\w \t*]*?\b(\w+)\s*\([^;{()]*\)\s*;",
                                      code(name), re.M)}


def readme_layout() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("### Code layout"):].split("\n## ", 1)[0]


@pytest.mark.parametrize("name", FILES)
def test_each_file_opens_with_what_it_owns(name):
    """Every C file and header opens with a comment "<name> — what it owns"."""
    lines = (CEXT / name).read_text().splitlines()
    assert lines[0] == "/*" and re.fullmatch(rf" \* {re.escape(name)} — \S.*", lines[1]), lines[:2]


def test_readme_code_layout_names_every_c_file():
    """The README's code-layout paragraph names every file of cext/."""
    layout = readme_layout()
    assert [n for n in FILES if n not in layout] == []


def test_readme_and_cext_name_only_files_that_exist():
    """No comment in cext/ and no line of the README points at a C file that is not there."""
    for path in [ROOT / "README.md", *sorted(CEXT.glob("*.[ch]")), CEXT / "build.py"]:
        named = set(re.findall(r"\bapl_\w+\.[ch]\b", path.read_text()))
        assert named <= set(FILES), f"{path.name} names {sorted(named - set(FILES))}"


def test_functions_used_across_files_are_declared_once_in_a_header():
    """Every non-static function is declared in exactly one header (apl.h and its
    includes for the public API, apl_int.h / apl_store_int.h for internal ones),
    and no .c file declares a function another file defines."""
    declared = {h: prototypes(h) for h in PUBLIC + INTERNAL}
    defined: dict[str, str] = {}
    for c in C_FILES:
        for fn, static in definitions(c).items():
            if not static:
                assert fn not in defined, f"{fn} defined in {defined[fn]} and {c}"
                defined[fn] = c
        stray = prototypes(c) - set(definitions(c))
        assert not stray, f"{c} declares {sorted(stray)}: a header's job"
    for fn, c in defined.items():
        where = [h for h, names in declared.items() if fn in names]
        assert len(where) == 1, f"{fn} ({c}) is declared in {where or 'no header'}"
    assert len(defined) > 80


def test_only_the_public_api_is_exported():
    """The compiled module exports what apl.h declares and nothing internal: a helper
    shared between files is a direct call inside the module, not an interposable symbol."""
    dll = ctypes.CDLL(_cext.__file__)
    public = set().union(*(prototypes(h) for h in PUBLIC))
    internal = set().union(*(prototypes(h) for h in INTERNAL))
    assert public and internal
    assert [fn for fn in sorted(public) if not hasattr(dll, fn)] == []
    assert [fn for fn in sorted(internal) if hasattr(dll, fn)] == []
