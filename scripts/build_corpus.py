"""Build the bundled corpus from Debian packages (see src/moecore/resources/PROVENANCE.md).

Reads three public-domain / PSF-licensed sources installed by apt:
  * bible-kjv      -> `bible -f "Gen1:1-Rev22:21"` (King James Version, public domain)
  * jargon-text    -> /usr/share/doc/jargon-text/jargon.txt.gz (Jargon File 4.4.7, public domain)
  * python3.11-doc -> /usr/share/doc/python3.11/html/_sources/**/*.rst.txt (PSF licence)

Writes src/moecore/resources/corpus.jsonl.xz: one JSON document per line {"id", "source", "text"}.
The train / calibration / held-out split is computed from the id by
`moecore.data.split_of` (a hash), so it is deterministic and needs no extra files.

Usage: python scripts/build_corpus.py [-o src/moecore/resources/corpus.jsonl.xz]
"""
from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import re
import subprocess
import unicodedata
from pathlib import Path

PY_DOC = Path("/usr/share/doc/python3.11/html/_sources")
JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")


def clean(text: str) -> str:
    """NFC-normalise, drop control characters, collapse runs of blank lines and trailing spaces."""
    text = unicodedata.normalize("NFC", text).replace("\r", "")
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def kjv_documents():
    """One document per chapter; verse references are removed."""
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters: dict[str, list[str]] = {}
    order: list[str] = []
    for line in out.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if not m:
            continue
        key = f"{m.group(1)}{m.group(2)}"
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(m.group(4).strip())
    for key in order:
        yield {"id": f"kjv/{key}", "source": "kjv", "text": clean(" ".join(chapters[key]))}


def jargon_documents(entries_per_doc: int = 8):
    """The Jargon File split at blank-line-separated headword entries, grouped into documents."""
    raw = gzip.open(JARGON, "rt", encoding="utf-8", errors="replace").read()
    paras = [p for p in re.split(r"\n\s*\n", raw) if p.strip()]
    for i in range(0, len(paras), entries_per_doc):
        body = "\n\n".join(re.sub(r"^ {1,3}", "", p, flags=re.M) for p in paras[i:i + entries_per_doc])
        yield {"id": f"jargon/{i // entries_per_doc:05d}", "source": "jargon", "text": clean(body)}


def pydoc_documents():
    """One document per reST source file of the Python 3.11 documentation; decorative lines dropped."""
    for path in sorted(PY_DOC.rglob("*.rst.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        text = re.sub(r"^([=\-~^*#\"'`.+]{3,})$", "", text, flags=re.M)  # section underlines
        rel = path.relative_to(PY_DOC).as_posix().removesuffix(".rst.txt")
        yield {"id": f"pydoc/{rel}", "source": "pydoc", "text": clean(text)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="src/moecore/resources/corpus.jsonl.xz")
    args = ap.parse_args()
    docs = [d for gen in (kjv_documents(), jargon_documents(), pydoc_documents()) for d in gen if len(d["text"]) > 200]
    out = Path(args.output)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with lzma.open(tmp, "wt", encoding="utf-8", preset=9) as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    by_src: dict[str, int] = {}
    for d in docs:
        by_src[d["source"]] = by_src.get(d["source"], 0) + len(d["text"])
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB xz): {len(docs)} documents, chars by source {by_src}")


if __name__ == "__main__":
    main()
