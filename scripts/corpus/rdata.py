"""A minimal reader for R's lazy-load databases (.rdx/.rdb), enough for character vectors.

R packages ship their data sets as `data/Rdata.rdx` (a gzip-compressed serialized index) and
`data/Rdata.rdb` (the objects, each a 4-byte big-endian length then a zlib stream). Both hold R's
XDR serialization format (R Internals, "Serialization formats"). We read it without R so the
corpus builder needs no R installation; only the SEXP types that data sets use are handled.
"""
import gzip
import struct
import zlib
from pathlib import Path

# SEXP type codes (R Internals, section 1.1) and the serializer's special codes.
SYMSXP, LISTSXP, CLOSXP, ENVSXP, LANGSXP = 1, 2, 3, 4, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 9, 10, 13, 14, 16, 19
ALTREP_SXP, EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP = 238, 242, 241, 253
UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP = 252, 251, 250
NAMESPACESXP, PACKAGESXP, PERSISTSXP = 249, 248, 247
NILVALUE_SXP, REFSXP = 254, 255
NA_STRING_LENGTH = -1
LATIN1_MASK = 1 << 2  # in a CHARSXP's levels; anything else is read as UTF-8 (or ASCII)


class RObject:
    """A vector with attributes (names, class, ...); `value` is a Python list."""

    def __init__(self, value, attributes=None):
        self.value = value
        self.attributes = attributes or {}

    def __repr__(self):
        return f"RObject({self.value!r:.60}, attributes={list(self.attributes)})"


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs = []  # symbols and environments, referred back to by REFSXP

    def take(self, n):
        if self.pos + n > len(self.data):
            raise ValueError(f"R serialization truncated at byte {self.pos} (wanted {n} more)")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self):
        return struct.unpack(">i", self.take(4))[0]

    def length(self):
        n = self.int()
        if n == -1:  # long vector: two more ints give the 64-bit length
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self):
        fmt = self.take(2)
        if fmt != b"X\n":
            raise ValueError(f"only R's XDR serialization ('X\\n') is supported, got {fmt!r}")
        version = self.int()
        self.int(), self.int()  # writer's and minimum reader's R versions
        if version == 3:
            self.take(self.int())  # native encoding name, e.g. "UTF-8"
        elif version != 2:
            raise ValueError(f"R serialization version {version} is not 2 or 3")

    def attributes(self, has_attr):
        if not has_attr:
            return {}
        pairs = self.item()
        return dict(pairs) if isinstance(pairs, list) else {}

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if kind in (NILVALUE_SXP, EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP,
                    MISSINGARG_SXP, BASENAMESPACE_SXP):
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind in (NAMESPACESXP, PACKAGESXP, PERSISTSXP):
            self.int()  # always 0
            strings = [self.item() for _ in range(self.int())]
            self.refs.append(strings)
            return strings
        if kind == ENVSXP:
            self.int()  # locked flag
            env = {}
            self.refs.append(env)
            env["enclos"], env["frame"], env["hashtab"], env["attrib"] = (
                self.item(), self.item(), self.item(), self.item())
            return env
        if kind in (LISTSXP, LANGSXP, CLOSXP):
            # A pairlist, read iteratively: [(tag, value), ...].
            pairs = []
            while True:
                self.attributes(has_attr)
                tag = self.item() if has_tag else None
                pairs.append((tag, self.item()))
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
                if kind == NILVALUE_SXP:
                    return pairs
                if kind not in (LISTSXP, LANGSXP, CLOSXP):
                    self.pos -= 4  # an improper tail: read it as an ordinary item
                    pairs.append((None, self.item()))
                    return pairs
        if kind == CHARSXP:
            n = self.int()
            if n == NA_STRING_LENGTH:
                return None
            raw = self.take(n)
            return raw.decode("latin-1" if levels & LATIN1_MASK else "utf-8", errors="replace")
        if kind in (STRSXP, VECSXP):
            value = [self.item() for _ in range(self.length())]
        elif kind in (INTSXP, LGLSXP):
            n = self.length()
            value = list(struct.unpack(f">{n}i", self.take(4 * n)))
        elif kind == REALSXP:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind == ALTREP_SXP:
            self.item()  # class info, e.g. (compact_intseq, base, type)
            state = self.item()
            self.item()  # attributes
            return state
        else:
            raise ValueError(f"R SEXP type {kind} is not supported by this minimal reader")
        attrs = self.attributes(has_attr)
        return RObject(value, attrs) if attrs else value


def unserialize(data: bytes):
    """Decodes one serialized R object (the bytes after decompression)."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def read_lazyload_db(rdx_path, rdb_path):
    """Returns {name: object} for every variable of an R lazy-load database."""
    index = unserialize(gzip.decompress(Path(rdx_path).read_bytes()))
    entries = _named_list(index, "variables")
    blob = Path(rdb_path).read_bytes()
    out = {}
    for name, (offset, length) in entries.items():
        record = blob[offset:offset + length]
        # Each record: uncompressed length (4 bytes, big-endian), then a zlib stream.
        out[name] = unserialize(zlib.decompress(record[4:]))
    return out


def _named_list(obj, key):
    """Looks up `key` in an R named list (an RObject whose attribute `names` labels its values)."""
    if isinstance(obj, RObject):
        named = dict(zip(obj.attributes.get("names", []), obj.value))
    else:
        named = dict(obj)
    value = named[key]
    if isinstance(value, RObject):
        return dict(zip(value.attributes.get("names", []), value.value))
    return value
