"""Readers for the array files fastkl streams: ``.npy``, ``.npz``, ``.safetensors`` and
llama.cpp ``--kl-divergence-base`` logits files.

Every reader gives a ``Source``: the array's shape and storage dtype, and ``read(e0, e1)``,
elements ``e0:e1`` of the C-order flattening as a native float32/float64 (or int64) array.
Uncompressed data is memory-mapped; ``release(e0, e1)`` drops those pages from the process
(``madvise(MADV_DONTNEED)``), so resident memory stays bounded by one block whatever the file
size. Compressed ``.npz`` members are decompressed sequentially, one block at a time.

Formats (all little-endian unless the ``.npy`` header says otherwise):

* ``.npy``: numpy's format (magic ``\\x93NUMPY``, header dict, raw C-order data).
* ``.npz``: a zip of ``.npy`` members; the one named ``logits`` (or the only float array).
* ``.safetensors``: 8-byte little-endian header length N, N bytes of JSON
  ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` (offsets from byte 8 + N),
  then the raw data; dtypes F64, F32, F16, BF16 and integer types.
* llama.cpp ``--kl-divergence-base``: ``_logits_``, n_ctx (uint32), n_vocab (int32), n_chunk
  (int32), n_ctx * n_chunk int32 tokens, then per chunk the rows of positions n_ctx/2 ...
  n_ctx - 2, each ``2 * ((n_vocab + 1) // 2) + 4`` uint16: two float32 (scale,
  min_log_prob) and one uint16 q per vocabulary entry with ``log p = scale * q +
  min_log_prob``. Rows are decoded block by block; as llama.cpp does, entries with
  ``log p <= -16`` count as zero probability in KL and top-1 (``-inf`` logits), and the
  observed token's log-probability is the decoded value itself.

A ``name`` after ``::`` selects a member / tensor (``file.npz::logits``).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import zipfile
from typing import Any

import numpy as np

PAGE = mmap.PAGESIZE
LLAMA_MAGIC = b"_logits_"
LLAMA_FLOOR = -16.0  # llama.cpp ignores base entries with log p <= -16 in its KL sum

_ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8",
    "BOOL": "?",
}


def _err(path, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def split_name(spec) -> tuple[str, str | None]:
    """``"file.npz::key"`` -> ("file.npz", "key"); a plain path -> (path, None)."""
    s = os.fspath(spec)
    if "::" in s and not os.path.exists(s):
        path, _, key = s.rpartition("::")
        return path, key or None
    return s, None


# --------------------------------------------------------------------------- sources


class Source:
    """An N-D array in a file (or memory), read in blocks of the C-order flattening."""

    path: str
    shape: tuple
    dtype: np.dtype  # storage dtype
    tokens: np.ndarray | None = None  # per-row next tokens (llama.cpp files, "tokens" arrays)
    kind: str = "array"

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes_per_element(self) -> int:
        return self.dtype.itemsize

    def read(self, e0: int, e1: int) -> np.ndarray:
        raise NotImplementedError

    def release(self, e0: int, e1: int) -> None:
        """Drop the pages behind elements e0:e1 from this process (no-op where unmapped)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _native(a: np.ndarray, bf16: bool = False) -> np.ndarray:
    if bf16:  # bfloat16 = the high half of a float32
        return (a.astype("<u4") << 16).view("<f4").astype(np.float32)
    if a.dtype.kind == "f":
        if a.dtype.itemsize < 4:
            return a.astype(np.float32)
        return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))
    if a.dtype.kind in "iu":
        if np.can_cast(a.dtype, np.int64):
            return a.astype(np.int64)
        # uint64 stays uint64 (native): int64 would wrap 2**64 - 100 to -100, the ignore
        # index; the consumer's check (_checks.tokens_array, mask_array) sees the true value
        return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))
    return a


class ArraySource(Source):
    """An array-like in memory. A C-contiguous ``np.memmap`` (as ``np.load(path,
    mmap_mode="r")`` returns) gets its pages dropped after each block like a file."""

    def __init__(self, a, name: str):
        from ._checks import _to_numpy

        self.path = name
        x = _to_numpy(a)
        self._mm, self._delta = None, 0
        mm = getattr(x, "_mmap", None)
        # read-only maps only: dropping pages of a copy-on-write map would lose writes
        if (isinstance(x, np.memmap) and mm is not None and getattr(x, "mode", None) == "r"
                and x.flags.c_contiguous and x.size):
            try:
                base = np.frombuffer(mm, dtype=np.uint8)
                delta = x.ctypes.data - base.ctypes.data
                if 0 <= delta <= len(mm) - x.nbytes:
                    self._mm, self._delta = mm, delta
                del base
            except (TypeError, ValueError, BufferError):
                pass
        self._a = np.ascontiguousarray(x)
        self.shape = self._a.shape
        self.dtype = self._a.dtype

    def read(self, e0, e1):
        return _native(self._a.reshape(-1)[e0:e1])

    def release(self, e0, e1):
        if self._mm is None or e1 <= e0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        isz = self.dtype.itemsize
        start = (self._delta + e0 * isz) // PAGE * PAGE
        end = (self._delta + e1 * isz) // PAGE * PAGE
        if end > start:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (ValueError, OSError):
                self._mm = None


class MappedSource(Source):
    """Raw C-order data at ``offset`` of a file, memory-mapped read-only."""

    def __init__(self, path: str, offset: int, dtype, shape: tuple, *, bf16: bool = False,
                 fileobj=None):
        self.path = path
        self.offset = int(offset)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self._bf16 = bf16
        self._mm = None
        nbytes = self.size * self.dtype.itemsize
        if nbytes:
            f = fileobj if fileobj is not None else open(path, "rb")  # noqa: SIM115
            try:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            finally:
                if fileobj is None:
                    f.close()
            if hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
                self._mm.madvise(mmap.MADV_SEQUENTIAL)

    def raw(self, e0: int, e1: int) -> np.ndarray:
        isz = self.dtype.itemsize
        if e1 <= e0:
            return np.empty(0, self.dtype)
        return np.frombuffer(self._mm, dtype=self.dtype, count=e1 - e0,
                             offset=self.offset + e0 * isz)

    def read(self, e0, e1):
        return _native(self.raw(e0, e1), self._bf16)

    def release(self, e0, e1):
        if self._mm is None or e1 <= e0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        isz = self.dtype.itemsize
        start = (self.offset + e0 * isz) // PAGE * PAGE
        end = min(len(self._mm), self.offset + e1 * isz)
        # the last, partly used page is kept (the next block reads it again)
        end = end // PAGE * PAGE if end < len(self._mm) else end
        if end > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self):
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive somewhere: the GC will unmap it
                pass
            self._mm = None


class StreamSource(Source):
    """Raw C-order data from a file object read sequentially (compressed ``.npz``)."""

    def __init__(self, path: str, fileobj, dtype, shape: tuple):
        self.path = path
        self._f = fileobj
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self._pos = 0

    def read(self, e0, e1):
        if e0 != self._pos:
            raise ValueError(f"{self.path}: a compressed .npz member can only be read in order")
        n = (e1 - e0) * self.dtype.itemsize
        buf = self._f.read(n)
        if len(buf) != n:
            raise _err(self.path, f"truncated: expected {n} more bytes of data, got {len(buf)}")
        self._pos = e1
        return _native(np.frombuffer(buf, dtype=self.dtype))

    def close(self):
        self._f.close()


class LlamaSource(Source):
    """llama.cpp ``--kl-divergence-base`` file: rows of quantized log-probabilities."""

    kind = "llama"

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(20)
            if len(head) < 8 or head[:8] != LLAMA_MAGIC:
                raise _err(path, f"not a llama.cpp logits file (magic {head[:8]!r}, expected "
                                 f"{LLAMA_MAGIC!r})")
            if len(head) < 20:
                raise _err(path, "truncated llama.cpp logits file: incomplete header")
            n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", head[8:20])
            if n_ctx < 2 or n_vocab < 1 or n_chunk < 0:
                raise _err(path, f"corrupt llama.cpp header: n_ctx={n_ctx}, n_vocab={n_vocab},"
                                 f" n_chunk={n_chunk}")
            self.n_ctx, self.n_vocab, self.n_chunk = n_ctx, n_vocab, n_chunk
            self.nv = 2 * ((n_vocab + 1) // 2) + 4
            self.first = n_ctx // 2
            self.rows_per_chunk = n_ctx - 1 - self.first
            n_tok = n_ctx * n_chunk
            rows = self.rows_per_chunk * n_chunk
            expected = 20 + 4 * n_tok + 2 * self.nv * rows
            if size != expected:
                what = "truncated" if size < expected else "has trailing bytes"
                raise _err(path, f"{what}: the header (n_ctx={n_ctx}, n_vocab={n_vocab}, "
                                 f"n_chunk={n_chunk}) implies {expected} bytes, the file has "
                                 f"{size}")
            toks = np.frombuffer(f.read(4 * n_tok), dtype="<i4").astype(np.int64)
        if toks.size and (toks.min() < 0 or toks.max() >= n_vocab):
            raise _err(path, f"corrupt llama.cpp file: token ids outside [0, {n_vocab})")
        # row i of chunk c is position first + i; its observed next token follows it
        idx = (np.arange(n_chunk)[:, None] * n_ctx + self.first + 1
               + np.arange(self.rows_per_chunk)[None, :])
        self.tokens = toks[idx.reshape(-1)]
        self.all_tokens = toks
        self.shape = (rows, n_vocab)
        self.dtype = np.dtype(np.float32)
        self._rows = MappedSource(path, 20 + 4 * n_tok, "<u2", (rows, self.nv))

    @property
    def bytes_per_element(self) -> int:
        return 2

    def decode(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows r0:r1 as float32 logits (log p, with entries at or below -16 as -inf) and
        the raw decoded log p of each row's observed token."""
        raw = self._rows.raw(r0 * self.nv, r1 * self.nv).reshape(r1 - r0, self.nv)
        head = np.ascontiguousarray(raw[:, :4]).view("<f4").astype(np.float32)
        scale, lo = head[:, :1], head[:, 1:2]
        if not (np.isfinite(head).all() and (scale >= 0).all()):
            raise _err(self.path, f"corrupt llama.cpp row header in rows {r0}..{r1 - 1}")
        out = raw[:, 4:4 + self.n_vocab].astype(np.float32)
        out *= scale
        out += lo
        tok = self.tokens[r0:r1]
        tok_logp = out[np.arange(r1 - r0), tok].astype(np.float64)
        drop = out <= LLAMA_FLOOR
        drop &= ~drop.all(axis=1, keepdims=True)  # never empty a row
        out[drop] = -np.inf
        return out, tok_logp

    def read(self, e0, e1):
        v = self.n_vocab
        if e0 % v or e1 % v:
            raise ValueError("llama.cpp rows are read whole")
        return self.decode(e0 // v, e1 // v)[0].reshape(-1)

    def release(self, e0, e1):
        v = self.n_vocab
        self._rows.release(e0 // v * self.nv, e1 // v * self.nv)

    def close(self):
        self._rows.close()


# --------------------------------------------------------------------------- opening


def _npy_header(f, path, where: str = "") -> tuple[np.dtype, tuple, bool]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, OSError, SyntaxError, EOFError) as exc:
        raise _err(path, f"not a valid .npy{where}: {exc}") from None
    if dtype.hasobject:
        raise _err(path, f"object arrays{where} cannot be streamed")
    if fortran and len(shape) > 1:
        raise _err(path, f"Fortran-ordered array{where}: save it C-ordered "
                         "(np.save(path, np.ascontiguousarray(a))) to stream it")
    return dtype, tuple(shape), fortran


def _open_npy(path: str) -> Source:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        dtype, shape, _ = _npy_header(f, path)
        off = f.tell()
        need = math.prod(shape) * dtype.itemsize
        if size - off != need:
            what = "truncated" if size - off < need else "has trailing bytes"
            raise _err(path, f"{what}: the header says shape {shape} of {dtype} "
                             f"({need} bytes of data) but {size - off} bytes follow it")
        return MappedSource(path, off, dtype, shape, fileobj=f)


def _pick(names: list[str], key: str | None, path: str, what: str,
          prefer: str = "logits") -> str:
    if key is not None:
        if key not in names:
            raise _err(path, f"no {what} named {key!r} (has {sorted(names)})")
        return key
    if prefer in names:
        return prefer
    cand = [n for n in names if n != "tokens"]
    if len(cand) == 1:
        return cand[0]
    raise _err(path, f"{len(cand)} {what}s {sorted(cand)}: name one as "
                     f"'{path}::NAME' (or call the array 'logits')")


def _npz_member(path: str, zf: zipfile.ZipFile, name: str) -> Source:
    info = zf.getinfo(name + ".npy") if name + ".npy" in zf.namelist() else zf.getinfo(name)
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            lh = f.read(30)
            if len(lh) < 30 or lh[:4] != b"PK\x03\x04":
                raise _err(path, f"corrupt zip entry {name!r}")
            nlen, xlen = struct.unpack("<HH", lh[26:30])
            start = info.header_offset + 30 + nlen + xlen
            f.seek(start)
            dtype, shape, _ = _npy_header(f, path, f" (member {name!r})")
            off = f.tell()
            need = math.prod(shape) * dtype.itemsize
            if info.file_size - (off - start) != need:
                raise _err(path, f"member {name!r}: the header says shape {shape} of {dtype} "
                                 f"({need} bytes) but the member holds "
                                 f"{info.file_size - (off - start)}")
            if start + info.file_size > os.path.getsize(path):
                raise _err(path, "truncated zip file")
            return MappedSource(path, off, dtype, shape, fileobj=f)
    fobj = zf.open(info)
    dtype, shape, _ = _npy_header(fobj, path, f" (member {name!r})")
    return StreamSource(path, fobj, dtype, shape)


def _open_npz(path: str, key: str | None, prefer: str) -> Source:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _err(path, f"not a valid .npz (zip) file: {exc}") from None
    names = [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
    name = _pick(names, key, path, "array", prefer)
    try:
        src = _npz_member(path, zf, name)
        if "tokens" in names and name != "tokens":
            with _npz_member(path, zf, "tokens") as ts:
                if ts.dtype.kind in "iu":
                    src.tokens = ts.read(0, ts.size).reshape(ts.shape)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise _err(path, f"corrupt .npz file: {exc}") from None
    return src


def _open_safetensors(path: str, key: str | None, prefer: str) -> Source:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _err(path, "truncated safetensors file (no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 << 20:
            raise _err(path, f"corrupt safetensors header length {n} (file has {size} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _err(path, f"corrupt safetensors JSON header: {exc}") from None
        if not isinstance(header, dict):
            raise _err(path, "corrupt safetensors header: not a JSON object")
        header.pop("__metadata__", None)
        data0 = 8 + n

        def tensor(name) -> Source:
            meta = header[name]
            try:
                dt, shape, (b0, b1) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise _err(path, f"corrupt safetensors entry {name!r}: {meta!r}") from None
            if dt not in _ST_DTYPES:
                raise _err(path, f"tensor {name!r} has unsupported dtype {dt}")
            dtype = np.dtype(_ST_DTYPES[dt])
            need = math.prod(shape) * dtype.itemsize
            if b1 - b0 != need or b0 < 0:
                raise _err(path, f"tensor {name!r}: shape {list(shape)} of {dt} needs {need} "
                                 f"bytes, data_offsets give {b1 - b0}")
            if data0 + b1 > size:
                raise _err(path, f"truncated: tensor {name!r} ends at byte {data0 + b1}, the "
                                 f"file has {size}")
            return MappedSource(path, data0 + b0, dtype, shape, bf16=(dt == "BF16"), fileobj=f)

        name = _pick(list(header), key, path, "tensor", prefer)
        src = tensor(name)
        if "tokens" in header and name != "tokens":
            with tensor("tokens") as ts:
                if ts.dtype.kind in "iu":
                    src.tokens = ts.read(0, ts.size).reshape(ts.shape)
        return src


def sniff(path: str) -> str:
    """The format of a file from its first bytes: "npy", "npz", "safetensors", "llama"."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "npz"
    if head[:8] == LLAMA_MAGIC:
        return "llama"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n < (100 << 20) and head[8:9] == b"{":
            return "safetensors"
    raise ValueError(f"{path}: unknown file format (not .npy, .npz, .safetensors or a llama.cpp "
                     f"--kl-divergence-base file; starts with {head[:8]!r})")


def open_source(spec: Any, name: str = "array", prefer: str = "logits") -> Source:
    """A ``Source`` for a path (format sniffed from the content; ``path::key`` picks a member)
    or an array-like."""
    if not isinstance(spec, (str, os.PathLike)):
        return ArraySource(spec, name)
    path, key = split_name(spec)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not an array file")
    fmt = sniff(path)
    if fmt == "npy":
        if key is not None:
            raise _err(path, "a .npy file holds one array: drop the '::name'")
        return _open_npy(path)
    if fmt == "npz":
        return _open_npz(path, key, prefer)
    if fmt == "safetensors":
        return _open_safetensors(path, key, prefer)
    return LlamaSource(path)


def load_small(spec: Any, name: str) -> np.ndarray:
    """A whole (small) array from a path or array-like: masks, tokens."""
    if not isinstance(spec, (str, os.PathLike)):
        from ._checks import _to_numpy

        return _to_numpy(spec)
    with open_source(spec, name, prefer=name) as src:
        if isinstance(src, LlamaSource):
            return src.tokens
        return src.read(0, src.size).reshape(src.shape).copy()


def write_llama_logits(path: str, tokens: np.ndarray, logits: np.ndarray, n_ctx: int) -> None:
    """Write a llama.cpp ``--kl-divergence-base`` file from full logits (``[n_chunk * (n_ctx -
    1 - n_ctx//2), n_vocab]`` rows, position order) and ``n_ctx * n_chunk`` tokens, quantized
    the way llama.cpp does (log-softmax, floor at max - 16, 16-bit steps). For tests and
    examples."""
    tokens = np.asarray(tokens, dtype="<i4")
    logits = np.asarray(logits, dtype=np.float32)
    n_vocab = logits.shape[1]
    n_chunk = tokens.size // n_ctx
    rows = n_ctx - 1 - n_ctx // 2
    if tokens.size != n_ctx * n_chunk or logits.shape[0] != rows * n_chunk:
        raise ValueError("tokens must be n_ctx * n_chunk and logits n_chunk * rows-per-chunk")
    nv = 2 * ((n_vocab + 1) // 2) + 4
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(LLAMA_MAGIC + struct.pack("<Iii", n_ctx, n_vocab, n_chunk))
        f.write(tokens.tobytes())
        for r in range(logits.shape[0]):
            x = logits[r].astype(np.float64)
            mx, mn = x.max(), max(x.min(), x.max() - 16)
            lse = math.log(np.exp(x - mx).sum())
            min_log_prob = np.float32(mn - mx - lse)
            scale = np.float32((mx - mn) / 65535.0) if mx > mn else np.float32(0.0)
            q = np.zeros(nv - 4, dtype="<u2")
            if scale > 0:
                q[:n_vocab] = np.clip(np.rint((x - mn) / scale), 0, 65535)
            f.write(np.array([scale, min_log_prob], dtype="<f4").tobytes())
            f.write(q.tobytes())
    os.replace(tmp, path)
