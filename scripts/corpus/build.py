"""From units to the corpus: cut, dedup, order, round-robin, cap, split, and write atomically.

Recipe (docs/data.md): each source's units are cut into documents of at most 8 KB at paragraph ends;
documents under 64 bytes are dropped; each source's documents are ordered by their SHA-256, a fixed
order that samples the whole source (the first files of a sorted list would otherwise fill a small
cap); sources of a domain take turns, one document each, so a cap keeps every source; a document seen
before in the domain is skipped; the domain stops before its bytes would pass the cap; one document
of every block of val_every goes to validation.
"""
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import text

FORMAT = "moelab-corpus-v1"
TRAIN_FILE, VAL_FILE, MANIFEST_FILE = "train.jsonl", "val.jsonl", "manifest.json"


@dataclass
class Doc:
    text: str
    source: str
    sha256: str
    nbytes: int


@dataclass
class SourceStats:
    source: str
    packages: list                 # [{"registry", "name", "version"}, ...]
    status: str = "ok"             # "ok" or "skipped: why"
    available_docs: int = 0        # after cutting, filtering and in-source dedup
    available_bytes: int = 0
    docs: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    bytes: dict = field(default_factory=lambda: {"train": 0, "val": 0})


@dataclass
class DomainResult:
    domain: str
    train: list
    val: list
    sources: list                  # SourceStats in the domain's source order


def source_documents(name, units, seps=text.PARAGRAPH_SEPS, max_bytes=text.MAX_DOC_BYTES,
                     min_bytes=text.MIN_DOC_BYTES):
    """The documents of one source, deduplicated and ordered by SHA-256."""
    docs = {}
    for _, unit in units:
        for piece in text.cut_document(unit, max_bytes, seps):
            data = piece.encode("utf-8")
            if len(data) >= min_bytes:
                digest = hashlib.sha256(data).hexdigest()
                docs.setdefault(digest, Doc(piece, name, digest, len(data)))
    return [docs[h] for h in sorted(docs)]


def round_robin(streams, cap_bytes):
    """Takes one document from each stream in turn until all are empty or the next would pass the cap."""
    seen = set()
    positions = [0] * len(streams)
    taken, total = [], 0
    live = [i for i, s in enumerate(streams) if s]
    while live:
        still = []
        for i in live:
            stream = streams[i]
            # Skip what another source already gave (same text twice in a domain).
            while positions[i] < len(stream) and stream[positions[i]].sha256 in seen:
                positions[i] += 1
            if positions[i] == len(stream):
                continue
            doc = stream[positions[i]]
            if cap_bytes and total + doc.nbytes > cap_bytes:
                return taken
            positions[i] += 1
            seen.add(doc.sha256)
            taken.append(doc)
            total += doc.nbytes
            if positions[i] < len(stream):
                still.append(i)
        live = still
    return taken


def split(docs, val_every):
    """One document of every block of val_every consecutive ones goes to validation (5% for 20).

    The chosen place moves back by one each block (the last document of block 0, the one before it
    in block 1, ...): sources take turns, so a fixed place (every 20th) would always land on the
    same source. Blocks count from the start, so a larger cap keeps this split and adds to it.
    """
    train, val = [], []
    for i, d in enumerate(docs):
        block, place = divmod(i, val_every)
        (val if place == (val_every - 1 - block) % val_every else train).append(d)
    return train, val


def build_domain(domain, streams, stats, cap_bytes, val_every):
    """streams: per source (in order) its ordered documents; stats: the matching SourceStats."""
    by_name = {s.source: s for s in stats}
    for stream, s in zip(streams, stats):
        s.available_docs = len(stream)
        s.available_bytes = sum(d.nbytes for d in stream)
    train, val = split(round_robin(streams, cap_bytes), val_every)
    for part, docs in (("train", train), ("val", val)):
        for d in docs:
            by_name[d.source].docs[part] += 1
            by_name[d.source].bytes[part] += d.nbytes
    return DomainResult(domain, train, val, stats)


# ---- writing ---------------------------------------------------------------------------------
def _json_line(doc: Doc, domain: str) -> str:
    line = json.dumps({"text": doc.text, "domain": domain, "source": doc.source}, ensure_ascii=False)
    # Readers that split on Unicode line breaks (Python's str.splitlines) would break these lines.
    return line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"


def interleave(results, part):
    """Documents of all domains, one domain after another in turns, so any prefix is a mix."""
    lists = [(r.domain, getattr(r, part)) for r in results]
    longest = max((len(docs) for _, docs in lists), default=0)
    for i in range(longest):
        for domain, docs in lists:
            if i < len(docs):
                yield domain, docs[i]


def _write_atomic(path: Path, chunks):
    """Writes to PATH.tmp, fsyncs, and renames: readers see the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    sha = hashlib.sha256()
    size = 0
    with open(tmp, "wb") as f:
        for chunk in chunks:
            data = chunk.encode("utf-8")
            sha.update(data)
            size += len(data)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp, {"bytes": size, "sha256": sha.hexdigest()}


def write_corpus(out_dir: Path, results, settings):
    """Writes train.jsonl, val.jsonl and manifest.json into out_dir; returns the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files, renames = {}, []
    for name, part in ((TRAIN_FILE, "train"), (VAL_FILE, "val")):
        tmp, info = _write_atomic(out_dir / name,
                                  (_json_line(doc, domain) for domain, doc in interleave(results, part)))
        info["docs"] = sum(len(getattr(r, part)) for r in results)
        files[name] = info
        renames.append((tmp, out_dir / name))
    manifest = {
        "format": FORMAT,
        **settings,
        "domains": [r.domain for r in results],
        "files": files,
        "domain_totals": {r.domain: {
            "docs": {"train": len(r.train), "val": len(r.val)},
            "bytes": {"train": sum(d.nbytes for d in r.train), "val": sum(d.nbytes for d in r.val)},
        } for r in results},
        "sources": [{"domain": r.domain, **s.__dict__} for r in results for s in r.sources],
    }
    tmp, _ = _write_atomic(out_dir / MANIFEST_FILE, [json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"])
    # The manifest goes first and comes back last: while the data files change, there is none.
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for src, dst in renames + [(tmp, out_dir / MANIFEST_FILE)]:
        os.replace(src, dst)
    dir_fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames themselves durable
    finally:
        os.close(dir_fd)
    return manifest
