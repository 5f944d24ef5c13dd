"""Hostile files and command lines: forged headers of every format (negative, float, huge,
inconsistent with the file size) are refused before anything is allocated from them; a seeded
mutation fuzz of small valid files only ever gives a result or a clean ValueError/OSError
naming the file; special files are refused before opening; the CLI answers one line; the
streamed results do not depend on the memory limit (or the process's size)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile

import numpy as np
import pytest

import fastkl
from fastkl.files import LlamaSource, open_source, write_llama_logits

# the directory that holds the fastkl under test (the source tree, or site-packages in CI):
# subprocesses import the same copy, never an unbuilt source tree beside the tests
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastkl.__file__)))
linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/status"),
                                reason="measures memory through /proc")


# --------------------------------------------------------------------------- writers


def _st(header, data: bytes = b"") -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _npy_bytes(header: str, data: bytes = b"", version=(1, 0)) -> bytes:
    """A .npy file with a hand-written header dict (padded as numpy pads it)."""
    h = header.encode("latin1" if version < (3, 0) else "utf8")
    hl = 4 if version >= (2, 0) else 2
    pad = -(6 + 2 + hl + len(h) + 1) % 64
    h = h + b" " * pad + b"\n"
    fmt = "<I" if hl == 4 else "<H"
    return b"\x93NUMPY" + bytes(version) + struct.pack(fmt, len(h)) + h + data


def _llama_head(n_ctx, n_vocab, n_chunk) -> bytes:
    return b"_logits_" + struct.pack("<Iii", n_ctx, n_vocab, n_chunk)


def _zip_with_forged_size(member: bytes, claimed: int, method=zipfile.ZIP_DEFLATED) -> bytes:
    """A zip whose central directory claims ``claimed`` uncompressed bytes for logits.npy."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        zf.writestr("logits.npy", member)
    raw = bytearray(buf.getvalue())
    cd = raw.rfind(b"PK\x01\x02")
    struct.pack_into("<I", raw, cd + 24, claimed)  # uncompressed size in the directory
    lh = raw.find(b"PK\x03\x04")
    struct.pack_into("<I", raw, lh + 22, claimed)
    return bytes(raw)


def _good_npy(shape=(4, 6), dtype="<f4") -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.arange(np.prod(shape), dtype=dtype).reshape(shape) / 7)
    return buf.getvalue()


FORGED = {
    # .npy
    "neg.npy": _npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (-3, -4), }"),
    "float.npy": _npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1.5, 8), }",
                            bytes(32)),
    "bool.npy": _npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (True, 2), }",
                           bytes(8)),
    "huge.npy": _npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296,"
                           " 4294967296), }", bytes(64)),
    "void0.npy": _npy_bytes("{'descr': '|V0', 'fortran_order': False, 'shape': "
                            "(4611686018427387903,), }"),
    "token.npy": _npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (8,\n"),
    "utf8.npy": _npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
                           bytes(8), version=(3, 0)).replace(b"'descr'", b"'\xff\xfecr'"),
    # .npz
    "claims_huge.npz": _zip_with_forged_size(_good_npy(), 0xFFFFFFF0),
    "claims_huge_stored.npz": _zip_with_forged_size(_good_npy(), 0xFFFFFFF0, zipfile.ZIP_STORED),
    # .safetensors
    "neg.safetensors": _st({"logits": {"dtype": "F32", "shape": [-3, -4],
                                       "data_offsets": [0, 48]}}, bytes(48)),
    "float.safetensors": _st({"logits": {"dtype": "F32", "shape": [1.5, 8],
                                         "data_offsets": [0, 32]}}, bytes(32)),
    "huge.safetensors": _st({"logits": {"dtype": "F32", "shape": [2**40, 2**40],
                                        "data_offsets": [0, 2**82]}}, bytes(16)),
    "strshape.safetensors": _st({"logits": {"dtype": "F32", "shape": "ab",
                                            "data_offsets": [0, 8]}}, bytes(8)),
    "listdtype.safetensors": _st({"logits": {"dtype": ["F32"], "shape": [2],
                                             "data_offsets": [0, 8]}}, bytes(8)),
    "stroffs.safetensors": _st({"logits": {"dtype": "F32", "shape": [2],
                                           "data_offsets": ["0", "8"]}}, bytes(8)),
    "backwards.safetensors": _st({"logits": {"dtype": "F32", "shape": [0],
                                             "data_offsets": [8, 8]},
                                  "x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
                                 bytes(8)),
    "notdict.safetensors": _st({"logits": [1, 2, 3]}, bytes(8)),
    "deep.safetensors": _st(b'{"a": ' + b"[" * 50000 + b"]" * 50000 + b"}"),
    # llama.cpp
    "ctx32.kld": _llama_head(2**32 - 1, 1, 0),
    "ctx28.kld": _llama_head(2**28, 1, 0),
    "chunks.kld": _llama_head(512, 32000, 2**31 - 1),
    "vocab.kld": _llama_head(8, 2**31 - 1, 1) + bytes(64),
}


def _outcome(path: str) -> tuple[str, str]:
    """(exception type or "ok", message) of opening ``path`` and reading it all."""
    try:
        with open_source(path) as src:
            if isinstance(src, LlamaSource):
                if src.shape[0]:
                    src.decode(0, src.shape[0])
            else:
                src.read(0, src.size)
        return "ok", ""
    except Exception as exc:  # noqa: BLE001 - the test reports any type
        return type(exc).__name__, str(exc)


@linux_only
def test_forged_headers_refused_before_allocating(tmp_path):
    """Each forged file is a ValueError naming it, in a process whose address space is
    capped at its size after import + 600 MB (a header-sized allocation cannot happen)."""
    for name, content in FORGED.items():
        (tmp_path / name).write_bytes(content)
    code = textwrap.dedent(f"""
        import json, os, resource, sys
        sys.path.insert(0, {ROOT!r})
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import test_hostile_files as t
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (vm + (600 << 20), vm + (600 << 20)))
        out = {{n: t._outcome(os.path.join({str(tmp_path)!r}, n)) for n in t.FORGED}}
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name in FORGED:
        kind, msg = out[name]
        if name == "ctx28.kld":  # a valid (empty) header: nothing to allocate
            assert kind == "ok", (name, kind, msg)
            continue
        assert kind == "ValueError", (name, kind, msg)
        assert name in msg, (name, msg)


@pytest.mark.parametrize("name,match", [
    ("neg.safetensors", r"invalid dimension -3"),
    ("float.safetensors", r"invalid dimension 1.5"),
    ("strshape.safetensors", r"shape must be a list"),
    ("listdtype.safetensors", r"dtype must be a string"),
    ("huge.safetensors", r"too many elements"),
    ("deep.safetensors", r"nested too deeply"),
    ("neg.npy", r"invalid dimension -3"),
    ("float.npy", r"not a valid .npy"),
    ("token.npy", r"not a valid .npy"),
    ("ctx32.kld", r"corrupt llama.cpp header"),
    ("claims_huge.npz", r"corrupt zip directory|truncated"),
])
def test_forged_header_messages(tmp_path, name, match):
    f = tmp_path / name
    f.write_bytes(FORGED[name])
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((4, 6), np.float32))
    with pytest.raises(ValueError, match=match) as exc:
        fastkl.kl_mc_file(f, good)
    assert name in str(exc.value)


def test_llama_bad_token_names_position(tmp_path):
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 10, 16)
    write_llama_logits(str(tmp_path / "a.kld"), tokens, rng.normal(size=(6, 10)), 8)
    raw = bytearray((tmp_path / "a.kld").read_bytes())
    struct.pack_into("<i", raw, 20 + 4 * 5, 77)
    (tmp_path / "b.kld").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"b.kld: .*token id 77 at position 5 \(byte 40\)"):
        open_source(tmp_path / "b.kld")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_and_directory_refused(tmp_path):
    fifo = tmp_path / "pipe.npy"
    os.mkfifo(fifo)
    good = tmp_path / "good.npy"
    np.save(good, np.zeros(4, np.float32))
    # opening a FIFO for reading would block forever: the check must come first
    with pytest.raises(ValueError, match="pipe.npy: is a FIFO"):
        fastkl.kl_mc_file(fifo, good)
    with pytest.raises(ValueError, match="pipe.npy: is a FIFO"):
        fastkl.kl_mc_file(good, good, mask=fifo)
    with pytest.raises(ValueError, match="is a directory"):
        fastkl.kl_mc_file(tmp_path, good)
    with pytest.raises(ValueError, match="null: is a character device"):
        fastkl.kl_mc_file("/dev/null", good)


# --------------------------------------------------------------------------- fuzz


def _valid_files(d) -> dict[str, bytes]:
    rng = np.random.default_rng(5)
    a = rng.normal(size=(3, 10)).astype(np.float32)
    tok = rng.integers(0, 10, 3)
    files = {}
    files["f.npy"] = _npy_bytes_of(a)
    for comp, nm in ((np.savez, "s.npz"), (np.savez_compressed, "c.npz")):
        buf = io.BytesIO()
        comp(buf, logits=a, tokens=tok)
        files[nm] = buf.getvalue()
    files["t.safetensors"] = _st(
        {"__metadata__": {"format": "pt"},
         "logits": {"dtype": "F32", "shape": [3, 10], "data_offsets": [0, 120]},
         "tokens": {"dtype": "I64", "shape": [3], "data_offsets": [120, 144]}},
        a.astype("<f4").tobytes() + tok.astype("<i8").tobytes())
    write_llama_logits(str(d / "l.kld"), rng.integers(0, 10, 16), rng.normal(size=(6, 10)), 8)
    files["l.kld"] = (d / "l.kld").read_bytes()
    return files


def _npy_bytes_of(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_mutation_fuzz(tmp_path):
    """Seeded truncations and byte flips of small valid files of each format: every outcome
    is a result or a ValueError/OSError that names the file; never another exception."""
    rng = np.random.default_rng(20261202)
    valid = _valid_files(tmp_path)
    good = tmp_path / "ref.npy"
    np.save(good, np.zeros((3, 10), np.float32))
    n = 0
    for name, raw in valid.items():
        for i in range(60):
            b = bytearray(raw)
            if i % 3 == 0:
                b = b[: int(rng.integers(0, len(b)))]
            else:
                hot = min(len(b), 160) if i % 3 == 1 else len(b)  # headers more often
                for _ in range(int(rng.integers(1, 4))):
                    b[int(rng.integers(0, hot))] = int(rng.integers(0, 256))
            path = tmp_path / f"m{i}_{name}"
            path.write_bytes(bytes(b))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kind, msg = _outcome(str(path))
                if kind == "ok" and not name.endswith(".kld"):
                    try:
                        fastkl.kl_mc_file(path, path, "k1", reduction="sum")
                    except (ValueError, TypeError) as exc:
                        kind, msg = type(exc).__name__, str(exc)
            assert kind in ("ok", "ValueError", "OSError", "TypeError"), (path.name, kind, msg)
            if kind != "ok":
                assert path.name in msg, (path.name, kind, msg)
            path.unlink()
            n += 1
    assert n == 300


# --------------------------------------------------------------------------- CLI


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from fastkl.cli import main

    try:
        rc = main([os.fspath(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str, cmd: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fastkl {cmd}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv,match", [
    (("--samples", "inf"), "--samples"),
    (("--samples", "nan"), "--samples"),
    (("--samples", "1"), "--samples"),
    (("--samples", "1e30"), "--samples"),
    (("--seed", "-1"), "--seed"),
    (("--repeats", "-3"), "--repeats"),
    (("--backend", "nope"), "unknown backend 'nope'"),
])
def test_cli_demo_bad_arguments(capsys, argv, match):
    rc, out, err = _cli(capsys, "demo", "--no-bench", *argv)
    assert rc != 0
    assert match in _one_error_line(err, "demo")


def test_cli_file_errors_are_one_line(capsys, tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((4, 6), np.float32))
    cases = {
        "deep.safetensors": FORGED["deep.safetensors"],
        "strshape.safetensors": FORGED["strshape.safetensors"],
        "token.npy": FORGED["token.npy"],
        "bad.npz": _zip_with_forged_size(_good_npy(), 0xFFFFFFF0),
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, logits=np.zeros((4, 6), np.float32))
    raw = bytearray(buf.getvalue())
    raw[raw.find(b"logits.npy") + 10 + 30: raw.find(b"logits.npy") + 10 + 40] = bytes(10)
    cases["zlib.npz"] = bytes(raw)  # deflate stream damaged after the local header
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        for cmd in ("mc", "compare"):
            rc, out, err = _cli(capsys, cmd, tmp_path / name, good)
            assert rc == 1, (name, cmd, err)
            assert name in _one_error_line(err, cmd), (name, cmd)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.npy")
        rc, out, err = _cli(capsys, "mc", good, tmp_path / "fifo.npy")
        assert rc == 1 and "fifo.npy: is a FIFO" in _one_error_line(err, "mc")


def test_cli_plot_target_checked_first(capsys, tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((4, 6), np.float32))
    rc, out, err = _cli(capsys, "compare", good, good, "--plot", tmp_path)
    assert rc == 1 and "is a directory" in _one_error_line(err, "compare")
    rc, out, err = _cli(capsys, "compare", good, good, "--plot", tmp_path / "no" / "x.png")
    assert rc == 1 and "does not exist" in _one_error_line(err, "compare")
    assert out == ""  # nothing was computed


def test_cli_undecodable_file_name(capsys, tmp_path):
    """A file name with bytes that are not UTF-8 prints escaped on a strict UTF-8 stdout."""
    name = os.fsdecode(b"q\xff.npy")
    try:
        np.save(tmp_path / name, np.zeros(8, np.float32))
    except (UnicodeEncodeError, OSError):
        pytest.skip("the file system refuses undecodable names")
    np.save(tmp_path / "p.npy", np.full(8, -0.5, np.float32))
    assert sys.stdout.errors == "strict"  # capsys: a strict UTF-8 text stream
    rc, out, err = _cli(capsys, "mc", tmp_path / name, tmp_path / "p.npy")
    assert rc == 0, err
    assert "q\\udcff.npy" in out and "Traceback" not in err
    rc, out, err = _cli(capsys, "mc", tmp_path / name, tmp_path / "missing.npy")
    assert rc == 1 and "missing.npy" in _one_error_line(err, "mc")


# --------------------------------------------------------------------------- kl_mc_file


def _bits(rep) -> tuple:
    return tuple(float(getattr(rep, f)).hex() for f in ("mean", "std", "sem", "value", "sum"))


@pytest.mark.parametrize("shape,red", [
    ((1_000_000,), "mean"),
    ((400, 2500), "seq-mean-token-mean"),
    ((3, 300_001), "seq-mean-token-sum"),  # rows longer than a unit: read in pieces
])
def test_kl_mc_file_bits_independent_of_memory(tmp_path, shape, red):
    rng = np.random.default_rng(8)
    q = rng.normal(-2, 1, size=shape).astype(np.float32)
    p = (q + rng.normal(0, 0.5, size=shape)).astype(np.float32)
    m = rng.random(shape) < 0.8
    for nm, a in (("q", q), ("p", p), ("m", m)):
        np.save(tmp_path / f"{nm}.npy", a)
    kw = dict(reduction=red, mask=tmp_path / "m.npy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the smallest limit is below one unit
        runs = [fastkl.kl_mc_file(tmp_path / "q.npy", tmp_path / "p.npy", memory_limit=lim,
                                  **kw) for lim in (4 << 20, 40 << 20, 400 << 20)]
        big = np.ones(150 << 17)  # 150 MiB more resident memory: a smaller budget
        runs.append(fastkl.kl_mc_file(tmp_path / "q.npy", tmp_path / "p.npy",
                                      memory_limit=400 << 20, **kw))
        del big
    assert len({_bits(r) for r in runs}) == 1, [_bits(r) for r in runs]
    ref = fastkl.kl_mc(q, p, reduction=red, mask=m)
    assert runs[0].value == pytest.approx(ref, rel=1e-12)
    st = fastkl.kl_mc_stats(q, p, mask=m)
    assert runs[0].std == pytest.approx(st.std, rel=1e-12)


def test_kl_mc_file_bad_mask_names_file_and_index(tmp_path):
    q = np.zeros((4, 6), np.float32)
    w = np.ones((4, 6))
    w[2, 3] = -0.5
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "w.npy", w)
    with pytest.raises(ValueError, match=r"w.npy: mask weights .* -0.5 at index \(2, 3\)"):
        fastkl.kl_mc_file(tmp_path / "q.npy", tmp_path / "q.npy", mask=tmp_path / "w.npy")


@linux_only
def test_seq_mean_long_row_memory_bound(tmp_path):
    """One 12e6-element row (48 MB per file) with memory_limit 16 MiB: seq-mean reads it in
    pieces, so the peak RSS grows by far less than the row (it mapped the whole row)."""
    n = 12_000_000
    for nm, v in (("q", -1.0), ("p", -1.25)):
        a = np.lib.format.open_memmap(tmp_path / f"{nm}.npy", "w+", np.float32, (1, n))
        a[:] = v
        a.flush()
        del a
        np.save(tmp_path / f"small_{nm}.npy", np.full((1, 9), v, np.float32))
    small = [str(tmp_path / f"small_{nm}.npy") for nm in ("q", "p")]
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import numpy as np, fastkl
        fastkl.kl_mc(np.zeros(9, np.float32), np.ones(9, np.float32))  # load, compile
        # the same call on a tiny file first: lazy imports and first-call set-up are not
        # what this test measures
        fastkl.kl_mc_file(*{small!r}, reduction="seq-mean-token-mean", memory_limit=16 << 20)
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) << 10
        h0 = hwm()
        r = fastkl.kl_mc_file({str(tmp_path / "q.npy")!r}, {str(tmp_path / "p.npy")!r},
                              reduction="seq-mean-token-mean", memory_limit=16 << 20)
        print(hwm() - h0, r.value)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    grew, value = res.stdout.split()
    assert float(value) == pytest.approx(np.expm1(-0.25) + 0.25, rel=1e-6)
    assert int(grew) < 24 << 20, f"peak RSS grew by {int(grew) >> 20} MiB"


# --------------------------------------------------------------------------- broadcast views


def test_full_reduction_of_broadcast_view_is_not_copied():
    """kl_mc / kl_mc_stats over all axes of a broadcast view (2**24 virtual elements, a 128
    MiB float64 copy per input) read it in segments: the same bits as over the copy, without
    allocating anything close to its size."""
    import tracemalloc

    rng = np.random.default_rng(4)
    a = rng.normal(-1, 1, size=1 << 12)
    q = np.broadcast_to(a, (1 << 12, 1 << 12))
    p = np.broadcast_to((a + rng.normal(0, 0.3, a.size))[:, None], (1 << 12, 1 << 12))
    m = np.broadcast_to(rng.random(1 << 12) < 0.9, (1 << 12, 1 << 12))
    fastkl.kl_mc(q[:2, :2], p[:2, :2])  # load / compile outside the measurement
    tracemalloc.start()
    try:
        got = fastkl.kl_mc(q, p, mask=m)
        st = fastkl.kl_mc_stats(q, p, "k1", mask=m)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 << 20, f"peak traced allocation {peak >> 20} MiB"
    # the reduction reads q in its memory order (the stride-0 axis last), as a copy would be
    qc, pc, mc = (np.ascontiguousarray(x.T) for x in (q, p, m))
    assert got == fastkl.kl_mc(qc, pc, mask=mc)  # bit for bit
    ref = fastkl.kl_mc_stats(qc, pc, "k1", mask=mc)
    assert (st.mean, st.std, st.n) == (ref.mean, ref.std, ref.n)
    # one broadcast input beside a plain one (read in the broadcast one's memory order)
    pp = np.ascontiguousarray(p)
    assert fastkl.kl_mc(q, pp, "k2") == fastkl.kl_mc(qc, np.ascontiguousarray(pp.T), "k2")


def test_kl_mc_file_broadcast_arrays_not_copied():
    """kl_mc_file over in-memory broadcast / transposed arrays reads blocks of them (it made
    a C-contiguous copy of each input first): the same bits as the copies, bounded memory."""
    import tracemalloc

    rng = np.random.default_rng(6)
    a = rng.normal(-1, 1, size=1 << 11).astype(np.float32)
    q = np.broadcast_to(a, (1 << 12, 1 << 11))  # 32 MiB per input if copied
    p = np.broadcast_to((a + 0.25)[::-1], q.shape)
    m = rng.random((1 << 11, 1 << 12)) < 0.5
    fastkl.kl_mc_file(q[:2], p[:2])  # load / compile outside the measurement
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 8 MiB is below one unit of blocks
        tracemalloc.start()
        try:
            got = fastkl.kl_mc_file(q, p, mask=m.T, memory_limit=8 << 20)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        want = fastkl.kl_mc_file(np.ascontiguousarray(q), np.ascontiguousarray(p),
                                 mask=np.ascontiguousarray(m.T), memory_limit=8 << 20)
    assert _bits(got) == _bits(want)
    assert peak < 24 << 20, f"peak traced allocation {peak >> 20} MiB"
