"""Text helpers of the corpus builder: cleaning, cutting into documents, and per-format readers.

All functions are pure (bytes or str in, str out), so tests can check them without any package.
"""
import email
import email.policy
import gzip
import re

MAX_DOC_BYTES = 8192
MIN_DOC_BYTES = 64

# Where a document may end, best first: a paragraph end, a line end, a sentence end, a space.
# Each is searched in the second half of the window, so documents stay at least half full.
PARAGRAPH_SEPS = (b"\n\n", b"\n", b". ", b" ")
# Dictionaries join entries with a blank line and a half, so that a cut prefers entry boundaries
# over the blank lines inside an entry.
ENTRY_SEP = "\n\n\n"
ENTRY_SEPS = (b"\n\n\n",) + PARAGRAPH_SEPS

# C0 controls other than tab and newline (form feeds in code, NULs in odd files) and the BOM.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f\ufeff]")


def clean_text(text: str) -> str:
    """Unix newlines, no control characters, no trailing spaces on lines (so blank lines are empty)."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    return "\n".join(line.rstrip(" \t") for line in text.split("\n"))


def decode_utf8(data: bytes):
    """The text of UTF-8 bytes, or None for anything else (binary or legacy-encoded files are skipped)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def cut_document(text: str, max_bytes: int = MAX_DOC_BYTES, seps=PARAGRAPH_SEPS):
    """Cuts text into pieces of at most max_bytes (UTF-8), each ending at the best boundary in seps."""
    data = text.encode("utf-8")
    pieces = []
    start = 0
    while len(data) - start > max_bytes:
        end = start + max_bytes
        cut = -1
        for sep in seps:
            i = data.rfind(sep, start + max_bytes // 2, end - len(sep) + 1)
            if i >= 0:
                cut = i + len(sep)
                break
        if cut < 0:
            # No boundary at all (a very long token): cut at a character boundary.
            cut = end
            while (data[cut] & 0xC0) == 0x80:
                cut -= 1
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    docs = (p.decode("utf-8").strip("\n").rstrip() for p in pieces)
    return [d for d in docs if d]


# ---- license headers -------------------------------------------------------------------------
# A header like glibc's LGPL notice would teach the router that code_c looks like legal text.
_LICENSE_WORDS = re.compile(r"copyright|licen[sc]e|spdx|warranty|\(c\) \d", re.I)
_C_LEADING_COMMENT = re.compile(r"\s*(/\*.*?\*/|(?://[^\n]*(?:\n|$))+)", re.S)


def strip_c_license_header(src: str) -> str:
    """Drops the comments before the first line of code that mention a copyright or license."""
    kept, pos = [], 0
    while True:
        m = _C_LEADING_COMMENT.match(src, pos)
        if not m:
            break
        if not _LICENSE_WORDS.search(m.group(1)):
            kept.append(m.group(1))  # e.g. "/* s_rintf.c -- float version of s_rint.c. */"
        pos = m.end()
    return "\n".join(kept + [src[pos:].lstrip("\n")]).lstrip("\n")


def strip_hash_license_header(src: str) -> str:
    """Drops leading '#' comment blocks that mention a copyright or license (keeps #! and coding lines)."""
    lines = src.split("\n")
    kept = []
    while lines and (lines[0].startswith("#!") or re.match(r"#.*coding[:=]", lines[0])):
        kept.append(lines.pop(0))
    dropped = False
    while True:
        while lines and not lines[0].strip():
            lines.pop(0)
        j = 0
        while j < len(lines) and lines[j].lstrip().startswith("#"):
            j += 1
        if j == 0:
            break
        block, lines = lines[:j], lines[j:]
        if _LICENSE_WORDS.search("\n".join(block)):
            dropped = True
        else:
            kept += block
    return "\n".join(kept + lines) if dropped else src


# ---- metamath --------------------------------------------------------------------------------
# Tokens are whitespace-separated. Proofs commented out inside $( ... $) go too.
_MM_PROOF = re.compile(r"(?<!\S)\$=(?!\S).*?(?<!\S)\$\.(?!\S)", re.S)


def strip_metamath_proofs(mm: str) -> str:
    """Replaces each proof `$= ... $.` by the `$.` that ends its statement (proofs are label noise)."""
    return _MM_PROOF.sub("$.", mm)


# ---- e-mail ----------------------------------------------------------------------------------
# A mailing-list footer: a rule line (----, ____, ====) among the last lines, with list words after it.
_RULE = re.compile(r"[-_=~]{15,}")
_LIST_WORDS = re.compile(r"unsubscribe|mailing list|listinfo|mailman", re.I)
FOOTER_MAX_LINES = 20


def strip_list_footer(body: str) -> str:
    lines = body.rstrip().split("\n")
    for i in range(max(0, len(lines) - FOOTER_MAX_LINES), len(lines)):
        if _RULE.match(lines[i]) and _LIST_WORDS.search("\n".join(lines[i:])):
            return "\n".join(lines[:i]).rstrip()
    return body


def email_body(raw: bytes):
    """The plain-text body of a mail, or None for HTML mails and mails without a text/plain part.

    Headers are dropped (the domain is the prose of mail: quoting, signatures, replies), and so is a
    mailing-list footer, which would otherwise repeat in thousands of documents.
    """
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    parts = list(msg.walk())
    if any(p.get_content_type() == "text/html" for p in parts):
        return None
    texts = []
    for part in parts:
        if part.get_content_type() != "text/plain":
            continue
        payload = part.get_payload(decode=True) or b""
        charset = part.get_content_charset() or "latin-1"
        try:
            texts.append(payload.decode(charset, errors="replace"))
        except LookupError:  # an unknown charset name
            texts.append(payload.decode("latin-1"))
    if not texts:
        return None
    body = clean_text("\n".join(texts))
    if re.search(r"<html|<body", body, re.I):
        return None
    return strip_list_footer(body).strip("\n")


# ---- dictd -----------------------------------------------------------------------------------
_DICTD_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def dictd_number(digits: str) -> int:
    """dictd's base-64 numbers: most significant digit first, alphabet A-Z a-z 0-9 + /."""
    n = 0
    for c in digits:
        n = n * 64 + _DICTD_B64[c]
    return n


_DICTD_METADATA = re.compile(r"00-?[a-z]")  # 00-database-info, 00databaseurl, 00-gcide-long, ...


def dictd_entries(index_text: str, body: bytes):
    """The entries of a dictd database in file order, without its 00-database metadata entries.

    index_text: the .index file (headword TAB offset TAB length per line); body: the uncompressed
    .dict.dz. Several headwords may point at one entry; each entry is returned once.
    """
    spans = set()
    for line in index_text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or _DICTD_METADATA.match(fields[0]):
            continue
        spans.add((dictd_number(fields[1]), dictd_number(fields[2])))
    entries = []
    for offset, length in sorted(spans):
        text = decode_utf8(body[offset:offset + length])
        if text is not None:
            entries.append(text.strip())
    return entries


def read_dictd(index_path, dict_dz_path):
    with open(index_path, encoding="utf-8", errors="replace") as f:
        index_text = f.read()
    with gzip.open(dict_dz_path) as f:  # dictzip is gzip with an extra random-access header
        body = f.read()
    return dictd_entries(index_text, body)
