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
import stat
import struct
import tokenize
import zipfile
import zlib
from typing import Any

import numpy as np

from ._core import flat_slice
from ._llama import expf as _expf

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


# what a parser of an untrusted header may raise besides ValueError: all become a ValueError
# naming the file (numpy's .npy header parser tokenizes and literal_evals; json recurses)
_PARSE_ERRORS = (ValueError, TypeError, SyntaxError, EOFError, OverflowError, RecursionError,
                 MemoryError, struct.error, tokenize.TokenError, zlib.error,
                 zipfile.BadZipFile, NotImplementedError, RuntimeError)
_MAX_DIM = 1 << 62  # no array dimension (or element count) beyond what numpy can index


def _check_shape(path, shape, what: str) -> tuple:
    """``shape`` from a header as a tuple of ints, each in [0, 2**62), with fewer than 2**62
    elements in all; else a ValueError naming the file."""
    if not isinstance(shape, (list, tuple)) or len(shape) > 64:
        raise _err(path, f"{what}: shape must be a list of at most 64 integers, got {shape!r}")
    for d in shape:
        if type(d) is not int or not 0 <= d < _MAX_DIM:
            raise _err(path, f"{what}: shape {list(shape)!r} has an invalid dimension {d!r} "
                             "(dimensions are integers >= 0)")
    if math.prod(d for d in shape if d) >= _MAX_DIM:
        raise _err(path, f"{what}: shape {list(shape)!r} has too many elements")
    return tuple(shape)


def _check_regular(path: str) -> int:
    """The size of ``path`` if it is a regular file; a directory, FIFO, socket or device is a
    ValueError before anything opens it (opening a FIFO would block)."""
    st = os.stat(path)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return st.st_size
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "not a regular file")
    raise ValueError(f"{path}: is {kind}, not an array file")


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
    """An array-like in memory, read block by block (a strided or broadcast view is not
    copied whole). A C-contiguous ``np.memmap`` (as ``np.load(path, mmap_mode="r")``
    returns) gets its pages dropped after each block like a file."""

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
        self._a = x if x.ndim else x.reshape(1)
        self.shape = self._a.shape
        self.dtype = self._a.dtype

    def read(self, e0, e1):
        return _native(flat_slice(self._a, e0, e1))

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
        try:
            buf = self._f.read(n)
        except (zlib.error, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            raise _err(self.path, f"corrupt compressed .npz data at element {e0}: {exc}") from None
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
        size = _check_regular(path)
        with open(path, "rb") as f:
            head = f.read(20)
            if len(head) < 8 or head[:8] != LLAMA_MAGIC:
                raise _err(path, f"not a llama.cpp logits file (magic {head[:8]!r}, expected "
                                 f"{LLAMA_MAGIC!r})")
            if len(head) < 20:
                raise _err(path, "truncated llama.cpp logits file: incomplete header")
            n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", head[8:20])
            # llama.cpp's n_ctx is an int: a larger uint32 is a corrupt header
            if not 2 <= n_ctx < 2**31 or n_vocab < 1 or n_chunk < 0:
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
            # everything below is bounded by the file size, checked above
            toks = np.frombuffer(f.read(4 * n_tok), dtype="<i4").astype(np.int64)
        bad = (toks < 0) | (toks >= n_vocab)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise _err(path, f"corrupt llama.cpp file: token id {int(toks[i])} at position {i} "
                             f"(byte {20 + 4 * i}) is outside [0, {n_vocab})")
        # row i of chunk c is position first + i; its observed next token follows it
        if rows:
            idx = (np.arange(n_chunk)[:, None] * n_ctx + self.first + 1
                   + np.arange(self.rows_per_chunk)[None, :])
            self.tokens = toks[idx.reshape(-1)]
        else:
            self.tokens = np.empty(0, np.int64)
        self.all_tokens = toks
        self.shape = (rows, n_vocab)
        self.dtype = np.dtype(np.float32)
        self._rows = MappedSource(path, 20 + 4 * n_tok, "<u2", (rows, self.nv))

    @property
    def bytes_per_element(self) -> int:
        return 2

    def decode(self, r0: int, r1: int, floor: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Rows r0:r1 as float32 logits (log p = scale * q + min_log_prob, in float32 as
        llama.cpp computes it; with ``floor``, entries at or below -16 as -inf) and the raw
        decoded log p of each row's observed token."""
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
        if not floor:
            return out, tok_logp
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
    except OSError:
        raise
    except _PARSE_ERRORS as exc:
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise _err(path, f"not a valid .npy{where}: {msg}") from None
    if dtype.hasobject:
        raise _err(path, f"object arrays{where} cannot be streamed")
    if dtype.itemsize == 0 or dtype.fields is not None or dtype.subdtype is not None:
        raise _err(path, f"unsupported dtype {dtype}{where}: only arrays of plain numbers can "
                         "be streamed")
    shape = _check_shape(path, shape, f".npy header{where}")
    if fortran and len(shape) > 1:
        raise _err(path, f"Fortran-ordered array{where}: save it C-ordered "
                         "(np.save(path, np.ascontiguousarray(a))) to stream it")
    return dtype, tuple(shape), fortran


def _open_npy(path: str) -> Source:
    size = _check_regular(path)
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


def _npz_member(path: str, zf: zipfile.ZipFile, name: str, size: int) -> Source:
    info = zf.getinfo(name + ".npy") if name + ".npy" in zf.namelist() else zf.getinfo(name)
    what = f"member {name!r}"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _err(path, f"{what}: unsupported zip compression method {info.compress_type} "
                         "(np.savez / np.savez_compressed write stored or deflated members)")
    if info.flag_bits & 0x1:
        raise _err(path, f"{what} is encrypted")
    if (info.header_offset < 0 or info.compress_size < 0 or info.file_size < 0
            or info.header_offset + 30 + info.compress_size > size):
        raise _err(path, f"truncated or corrupt zip directory: {what} claims "
                         f"{info.compress_size} bytes at offset {info.header_offset}, the file "
                         f"has {size}")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size:
            raise _err(path, f"corrupt zip directory: stored {what} has compressed size "
                             f"{info.compress_size} but size {info.file_size}")
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            lh = f.read(30)
            if len(lh) < 30 or lh[:4] != b"PK\x03\x04":
                raise _err(path, f"corrupt zip entry {name!r}")
            nlen, xlen = struct.unpack("<HH", lh[26:30])
            start = info.header_offset + 30 + nlen + xlen
            if start + info.file_size > size:
                raise _err(path, f"truncated zip file: {what} ends at byte "
                                 f"{start + info.file_size}, the file has {size}")
            f.seek(start)
            dtype, shape, _ = _npy_header(f, path, f" ({what})")
            off = f.tell()
            need = math.prod(shape) * dtype.itemsize
            if info.file_size - (off - start) != need:
                raise _err(path, f"{what}: the header says shape {shape} of {dtype} "
                                 f"({need} bytes) but the member holds "
                                 f"{info.file_size - (off - start)}")
            return MappedSource(path, off, dtype, shape, fileobj=f)
    # deflate expands at most ~1032:1, so a larger claimed size is a forged directory entry
    if info.file_size > 1100 * info.compress_size + 4096:
        raise _err(path, f"corrupt zip directory: {what} claims {info.file_size} bytes from "
                         f"{info.compress_size} compressed bytes")
    fobj = zf.open(info)
    try:
        dtype, shape, _ = _npy_header(fobj, path, f" ({what})")
        need = math.prod(shape) * dtype.itemsize
        have = info.file_size - fobj.tell()
    except BaseException:
        fobj.close()
        raise
    if have != need:
        fobj.close()
        raise _err(path, f"{what}: the header says shape {shape} of {dtype} ({need} bytes) "
                         f"but the member holds {have}")
    return StreamSource(path, fobj, dtype, shape)


def _open_npz(path: str, key: str | None, prefer: str) -> Source:
    size = _check_regular(path)
    try:
        zf = zipfile.ZipFile(path)
    except (*_PARSE_ERRORS, OSError) as exc:
        raise _err(path, f"not a valid .npz (zip) file: {exc}") from None
    src = None
    try:
        names = [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
        name = _pick(names, key, path, "array", prefer)
        src = _npz_member(path, zf, name, size)
        if "tokens" in names and name != "tokens":
            with _npz_member(path, zf, "tokens", size) as ts:
                if ts.dtype.kind in "iu":
                    src.tokens = ts.read(0, ts.size).reshape(ts.shape)
    except (*_PARSE_ERRORS, OSError) as exc:
        if src is not None:
            src.close()
        if isinstance(exc, ValueError) and str(exc).startswith(f"{path}:"):
            raise  # already names the file
        raise _err(path, f"corrupt .npz file: {exc}") from None
    finally:
        zf.close()  # an open member keeps the file open until it is closed
    return src


def _st_entry(path, name, meta, avail: int):
    """(dtype code, shape, begin, end) of a safetensors header entry, every field checked:
    types, signs, and offsets inside the ``avail`` data bytes that follow the header."""
    if not isinstance(meta, dict):
        raise _err(path, f"corrupt safetensors entry {name!r}: expected an object, got "
                         f"{type(meta).__name__}")
    dt, shape, offs = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dt, str):
        raise _err(path, f"corrupt safetensors entry {name!r}: dtype must be a string, got "
                         f"{dt!r:.80}")
    shape = _check_shape(path, shape, f"tensor {name!r}")
    if (not isinstance(offs, list) or len(offs) != 2
            or any(type(o) is not int for o in offs)):
        raise _err(path, f"corrupt safetensors entry {name!r}: data_offsets must be two "
                         f"integers, got {offs!r:.80}")
    b0, b1 = offs
    if not 0 <= b0 <= b1:
        raise _err(path, f"corrupt safetensors entry {name!r}: data_offsets {offs} are not "
                         "0 <= begin <= end")
    if b1 > avail:
        raise _err(path, f"truncated: tensor {name!r} ends at byte {b1} of the data, which "
                         f"has {avail} bytes")
    return dt, shape, b0, b1


def _open_safetensors(path: str, key: str | None, prefer: str) -> Source:
    size = _check_regular(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _err(path, "truncated safetensors file (no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 << 20:
            raise _err(path, f"corrupt safetensors header length {n} (file has {size} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, RecursionError, MemoryError) as exc:
            msg = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
            raise _err(path, f"corrupt safetensors JSON header: {msg}") from None
        if not isinstance(header, dict):
            raise _err(path, "corrupt safetensors header: not a JSON object")
        header.pop("__metadata__", None)
        data0 = 8 + n
        entries = {name: _st_entry(path, name, meta, size - data0)
                   for name, meta in header.items()}

        def tensor(name) -> Source:
            dt, shape, b0, b1 = entries[name]
            if dt not in _ST_DTYPES:
                raise _err(path, f"tensor {name!r} has unsupported dtype {dt:.40}")
            dtype = np.dtype(_ST_DTYPES[dt])
            need = math.prod(shape) * dtype.itemsize
            if b1 - b0 != need:
                raise _err(path, f"tensor {name!r}: shape {list(shape)} of {dt} needs {need} "
                                 f"bytes, data_offsets give {b1 - b0}")
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
    _check_regular(path)
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
    fmt = sniff(path)  # refuses directories, FIFOs, sockets and devices before opening
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
    as llama.cpp's ``perplexity`` does (``llama_quantize_rows``). For tests and examples."""
    tokens = np.asarray(tokens, dtype="<i4")
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [rows, n_vocab], got shape {logits.shape}")
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
        step = max(1, (4 << 20) // (8 * n_vocab))
        for r0 in range(0, logits.shape[0], step):
            head, q = llama_quantize_rows(logits[r0:r0 + step])
            out = np.zeros((q.shape[0], nv), dtype="<u2")
            out[:, :4] = head.astype("<f4").view("<u2")
            out[:, 4:4 + n_vocab] = q
            f.write(out.tobytes())
    os.replace(tmp, path)


def llama_quantize_rows(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's base-file encoding of float32 logit rows (``log_softmax`` with a uint16
    output in tools/perplexity/perplexity.cpp), in its float32 arithmetic: per row ``max``,
    ``min = max(min, max - 16)``, ``lse = (float) log(sum (double) expf(x - max))``,
    header ``(scale, min_log_prob) = ((max - min) / 65535, (min - max) - lse)`` and
    ``q = round_half_even((1 / scale) * (x - min))`` where ``x > min``, else 0 (all 0 when
    ``scale == 0``), stored modulo 2**16. Returns (float32 ``[rows, 2]``, uint16
    ``[rows, vocab]``)."""
    x = np.asarray(logits, dtype=np.float32)
    f32 = np.float32
    mx = x.max(axis=1)
    mn = np.maximum(x.min(axis=1), mx - f32(16))
    sum_exp = _expf(x - mx[:, None]).sum(axis=1, dtype=np.float64)
    lse = np.log(sum_exp).astype(np.float32)
    min_log_prob = (mn - mx) - lse
    scale = (mx - mn) / f32(65535)
    with np.errstate(divide="ignore"):
        inv = np.where(scale != 0, f32(1) / scale, f32(0)).astype(np.float32)
    v = np.rint(inv[:, None] * (x - mn[:, None]))  # nearest_int: round half to even
    v = np.where(x > mn[:, None], v, f32(0)).astype(np.int64) & 0xFFFF
    v[scale == 0] = 0
    return np.stack([scale, min_log_prob], axis=1), v.astype(np.uint16)
