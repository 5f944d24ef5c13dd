"""Rewrites an sdist (.tar.gz) reproducibly: entries sorted, every mtime set to
SOURCE_DATE_EPOCH, owners root:root, modes 644/755, a gzip header without time or name.

    python tools/normalize_sdist.py dist/fastkl-X.tar.gz
"""

from __future__ import annotations

import gzip
import io
import os
import sys
import tarfile


def normalize(path: str, epoch: int) -> None:
    with tarfile.open(path, "r:gz") as src:
        members = sorted(src.getmembers(), key=lambda m: m.name)
        data = {m.name: src.extractfile(m).read() for m in members if m.isfile()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for m in members:
            m.mtime = epoch
            m.pax_headers = {}  # setuptools writes mtime there too; it would win
            m.uid = m.gid = 0
            m.uname = m.gname = "root"
            m.mode = 0o755 if (m.isdir() or m.mode & 0o100) else 0o644
            dst.addfile(m, io.BytesIO(data[m.name]) if m.isfile() else None)
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
        gz.write(buf.getvalue())


if __name__ == "__main__":
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "315532800"))
    for p in sys.argv[1:]:
        normalize(p, epoch)
