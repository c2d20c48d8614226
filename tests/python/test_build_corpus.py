"""Tests of the corpus builder's pure parts and of the committed small corpus.

Run: /usr/bin/python3 -m unittest discover -s tests/python -v   (stdlib only; no package downloads)
"""
import gzip
import hashlib
import json
import struct
import sys
import tempfile
import unittest
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from corpus import build, rdata, text  # noqa: E402

FIXTURE = REPO / "tests/data/corpus_small"


class CutDocument(unittest.TestCase):
    def test_short_text_is_one_document(self):
        self.assertEqual(text.cut_document("one\n\ntwo\n", 100), ["one\n\ntwo"])

    def test_cuts_at_paragraph_ends_within_the_limit(self):
        paras = [f"paragraph {i} " + "x" * 40 for i in range(20)]
        docs = text.cut_document("\n\n".join(paras), 200)
        self.assertTrue(all(len(d.encode()) <= 200 for d in docs))
        self.assertEqual("\n\n".join(docs), "\n\n".join(paras))  # nothing lost, cuts only at "\n\n"
        self.assertTrue(all(d.startswith("paragraph") for d in docs))

    def test_falls_back_to_sentences_then_a_character_boundary(self):
        sentences = "This is a sentence. " * 30
        docs = text.cut_document(sentences, 100)
        self.assertTrue(all(d.endswith(".") for d in docs[:-1]))
        cyrillic = "ж" * 500  # 2 bytes each, no boundary at all
        docs = text.cut_document(cyrillic, 101)
        self.assertTrue(all(len(d.encode()) <= 101 for d in docs))
        self.assertEqual("".join(docs), cyrillic)

    def test_entry_separator_wins_over_blank_lines_inside_entries(self):
        entries = [f"word{i}\n  sense one\n\n  sense two of entry {i}" for i in range(10)]
        docs = text.cut_document(text.ENTRY_SEP.join(entries), 150, text.ENTRY_SEPS)
        self.assertTrue(all(d.startswith("word") for d in docs))


class Cleaning(unittest.TestCase):
    def test_clean_text(self):
        self.assertEqual(text.clean_text("a \r\nb\t\r\n\x0cc\ufeff\x00  \n"), "a\nb\nc\n")

    def test_c_license_header_is_stripped_but_description_kept(self):
        src = ("/* malloc.c -- a memory allocator. */\n"
               "/* Copyright (C) 1996-2022 Free Software Foundation, Inc.\n"
               "   Lesser General Public License ... */\n\n"
               "#include <stdlib.h>\nint x; /* Copyright later stays */\n")
        out = text.strip_c_license_header(src)
        self.assertTrue(out.startswith("/* malloc.c -- a memory allocator. */\n#include <stdlib.h>"))
        self.assertNotIn("Free Software Foundation", out)
        self.assertIn("Copyright later stays", out)
        plain = "/* Just a comment. */\nint main(void) { return 0; }\n"
        self.assertEqual(text.strip_c_license_header(plain), plain)

    def test_hash_license_header_keeps_shebang(self):
        src = "#!/usr/bin/env python3\n# Copyright 2001 Someone\n# Licensed under X\n\n\"\"\"Doc.\"\"\"\nx = 1\n"
        self.assertEqual(text.strip_hash_license_header(src), "#!/usr/bin/env python3\n\"\"\"Doc.\"\"\"\nx = 1\n")
        self.assertEqual(text.strip_hash_license_header("# A note.\nx = 1\n"), "# A note.\nx = 1\n")

    def test_metamath_proofs_are_dropped(self):
        mm = ("$( Modus ponens. $)\n  ax-mp $a |- ps $.\n"
              "  idi $p |- ph $=\n    ( wi ) AB $.\n$( old: x $p |- ph $= ? $. $)\n")
        out = text.strip_metamath_proofs(mm)
        self.assertEqual(out, "$( Modus ponens. $)\n  ax-mp $a |- ps $.\n  idi $p |- ph $.\n$( old: x $p |- ph $. $)\n")


class Email(unittest.TestCase):
    HEADERS = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hi\r\n"

    def test_plain_body_without_headers_and_list_footer(self):
        raw = (self.HEADERS + b"Content-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
               b"Caf=C3=A9 at noon?\r\n\r\n-- kim\r\n\r\n"
               b"_______________________________________________\r\n"
               b"Some-list mailing list\r\nhttps://lists.example.org/mailman/listinfo/some-list\r\n")
        self.assertEqual(text.email_body(raw), "Café at noon?\n\n-- kim")

    def test_html_mails_are_dropped(self):
        raw = (self.HEADERS + b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=X\r\n\r\n"
               b"--X\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
               b"--X\r\nContent-Type: text/html\r\n\r\n<p>hello</p>\r\n--X--\r\n")
        self.assertIsNone(text.email_body(raw))


class Dictd(unittest.TestCase):
    def test_numbers(self):
        self.assertEqual(text.dictd_number("A"), 0)
        self.assertEqual(text.dictd_number("Kj"), 10 * 64 + 35)

    def test_entries_once_each_in_file_order_without_metadata(self):
        body = b"meta!apple\n  a fruit\nbanana\n  another fruit\n"

        def enc(n):  # dictd base 64, most significant digit first
            digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
            out = ""
            while True:
                out = digits[n % 64] + out
                n //= 64
                if not n:
                    return out

        index = (f"00-database-info\t{enc(0)}\t{enc(5)}\n"
                 f"banana\t{enc(21)}\t{enc(22)}\n"
                 f"apple\t{enc(5)}\t{enc(16)}\nmalus\t{enc(5)}\t{enc(16)}\n")
        self.assertEqual(text.dictd_entries(index, body), ["apple\n  a fruit", "banana\n  another fruit"])


def _xdr_strsxp(strings, names=None):
    """R's XDR serialization of a character vector (the subset rdata reads)."""
    out = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    return out + _strsxp_item(strings, names)


def _charsxp(s):
    data = s.encode()
    return struct.pack(">ii", 9 | (1 << 15), len(data)) + data  # CHARSXP, UTF-8 level


def _strsxp_item(strings, names=None):
    flags = 16 | ((1 << 9) if names else 0)
    out = struct.pack(">ii", flags, len(strings)) + b"".join(_charsxp(s) for s in strings)
    if names:  # attributes pairlist: tag "names" -> STRSXP
        out += struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 1) + _charsxp("names")
        out += _strsxp_item(names) + struct.pack(">i", 254)
    return out


class RData(unittest.TestCase):
    def test_character_vector(self):
        self.assertEqual(rdata.unserialize(_xdr_strsxp(["It is a truth", "", "ж"])), ["It is a truth", "", "ж"])

    def test_named_vector_keeps_names(self):
        obj = rdata.unserialize(_xdr_strsxp(["x", "y"], names=["a", "b"]))
        self.assertEqual(obj.value, ["x", "y"])
        self.assertEqual(obj.attributes["names"], ["a", "b"])

    def test_lazyload_database(self):
        book = _xdr_strsxp(["EMMA", "", "By Jane Austen"])
        record = struct.pack(">I", len(book)) + zlib.compress(book)
        # Index: list(variables = list(emma = c(offset, length)), references = list(), compressed = TRUE)
        intsxp = struct.pack(">ii", 13, 2) + struct.pack(">ii", 0, len(record))
        variables = (struct.pack(">ii", 19 | (1 << 9), 1) + intsxp
                     + struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 1) + _charsxp("names")
                     + _strsxp_item(["emma"]) + struct.pack(">i", 254))
        index = (b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
                 + struct.pack(">ii", 19 | (1 << 9), 1) + variables
                 + struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 1) + _charsxp("names")
                 + _strsxp_item(["variables"]) + struct.pack(">i", 254))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "Rdata.rdx").write_bytes(gzip.compress(index))
            (Path(tmp) / "Rdata.rdb").write_bytes(record)
            books = rdata.read_lazyload_db(Path(tmp) / "Rdata.rdx", Path(tmp) / "Rdata.rdb")
        self.assertEqual(books, {"emma": ["EMMA", "", "By Jane Austen"]})


def _docs(source, texts):
    return build.source_documents(source, [(str(i), t) for i, t in enumerate(texts)])


class Build(unittest.TestCase):
    def test_source_documents_drop_short_dedup_and_order_by_hash(self):
        long = ["long document number %d " % i + "y" * 80 for i in range(5)]
        docs = _docs("s", long + ["short"] + long[:2])
        self.assertEqual(len(docs), 5)
        self.assertEqual([d.sha256 for d in docs], sorted(d.sha256 for d in docs))
        self.assertEqual(docs[0].sha256, hashlib.sha256(docs[0].text.encode()).hexdigest())

    def test_round_robin_keeps_every_source_under_a_cap(self):
        a = _docs("a", ["a%d " % i + "x" * 96 for i in range(50)])
        b = _docs("b", ["b%d " % i + "x" * 96 for i in range(50)])
        taken = build.round_robin([a, b], cap_bytes=1000)
        self.assertLessEqual(sum(d.nbytes for d in taken), 1000)
        self.assertEqual([d.source for d in taken[:4]], ["a", "b", "a", "b"])
        self.assertEqual(len(build.round_robin([a, b], cap_bytes=0)), 100)  # 0 = no cap

    def test_round_robin_skips_a_document_another_source_gave(self):
        same = "the same text in two packages " * 5
        a, b = _docs("a", [same, "only in a " * 10]), _docs("b", [same])
        taken = build.round_robin([a, b], cap_bytes=0)
        self.assertEqual(sorted(d.text for d in taken), sorted([same.rstrip(), ("only in a " * 10).rstrip()]))

    def test_split_one_per_block_spread_over_sources(self):
        a = _docs("a", ["a%d " % i + "x" * 96 for i in range(40)])
        b = _docs("b", ["b%d " % i + "x" * 96 for i in range(40)])
        taken = build.round_robin([a, b], cap_bytes=0)
        train, val = build.split(taken, 20)
        # Every 20th of the domain would be b's documents only; the moving place alternates.
        self.assertEqual(val, [taken[19], taken[38], taken[57], taken[76]])
        self.assertEqual([d.source for d in val], ["b", "a", "b", "a"])
        self.assertEqual(len(train), 76)
        # A prefix (a smaller cap) keeps the split of its complete blocks.
        self.assertEqual(build.split(taken[:45], 20)[1], val[:2])

    def test_write_is_deterministic_and_manifest_matches(self):
        docs = _docs("src", ["document %d " % i + "z" * 70 for i in range(30)])
        with tempfile.TemporaryDirectory() as tmp:
            outs = []
            for run in ("one", "two"):
                stats = build.SourceStats("src", [{"registry": "local", "name": "x", "version": "1"}])
                result = build.build_domain("d", [list(docs)], [stats], 0, 20)
                manifest = build.write_corpus(Path(tmp) / run, [result], {"val_every": 20})
                outs.append({f: (Path(tmp) / run / f).read_bytes()
                             for f in (build.TRAIN_FILE, build.VAL_FILE, build.MANIFEST_FILE)})
                self.assertEqual(sorted(p.name for p in (Path(tmp) / run).iterdir()),
                                 sorted([build.TRAIN_FILE, build.VAL_FILE, build.MANIFEST_FILE]))  # no .tmp left
            self.assertEqual(outs[0], outs[1])
            self.assertEqual(manifest["files"][build.VAL_FILE]["docs"], 1)
            self.assertEqual(manifest["sources"][0]["docs"], {"train": 29, "val": 1})


class SmallCorpusFixture(unittest.TestCase):
    def test_format_domains_and_checksums(self):
        manifest = json.loads((FIXTURE / "manifest.json").read_text("utf-8"))
        self.assertEqual(manifest["format"], build.FORMAT)
        self.assertGreaterEqual(len(manifest["domains"]), 4)
        seen = {}
        for name in (build.TRAIN_FILE, build.VAL_FILE):
            data = (FIXTURE / name).read_bytes()
            self.assertEqual(hashlib.sha256(data).hexdigest(), manifest["files"][name]["sha256"])
            lines = data.decode("utf-8").split("\n")
            self.assertEqual(lines[-1], "")
            for line in lines[:-1]:
                record = json.loads(line)
                self.assertEqual(list(record), ["text", "domain", "source"])
                self.assertIn(record["domain"], manifest["domains"])
                self.assertGreaterEqual(len(record["text"].encode()), manifest["min_doc_bytes"])
                self.assertLessEqual(len(record["text"].encode()), manifest["max_doc_bytes"])
                seen.setdefault(record["domain"], set()).add(name)
        # Every domain has both a train and a validation part.
        self.assertEqual(seen, {d: {build.TRAIN_FILE, build.VAL_FILE} for d in manifest["domains"]})


if __name__ == "__main__":
    unittest.main()
