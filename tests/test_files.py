"""kl_mc_file / compare_logits over files the tests write themselves: .npy, .npz (stored and
compressed), .safetensors (written here from the format description) and llama.cpp
--kl-divergence-base files (written here from the format description in DESIGN.md); block
streaming equals the in-memory result; corrupt files give a ValueError naming the file."""

from __future__ import annotations

import json
import math
import struct
import warnings

import numpy as np
import pytest

import fastkl

# --------------------------------------------------------------------------- writers


def write_safetensors(path, tensors: dict, bf16: tuple = ()) -> None:
    """8-byte little-endian header length, JSON header, raw little-endian data."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    codes = {"<f4": "F32", "<f8": "F64", "<f2": "F16", "<i8": "I64", "<i4": "I32"}
    for name, arr in tensors.items():
        if name in bf16:  # round-to-nearest-even to bfloat16
            u = np.asarray(arr, dtype="<f4").view("<u4").astype(np.uint64)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
            raw, code = u.tobytes(), "BF16"
        else:
            a = np.asarray(arr)
            a = a.astype(a.dtype.newbyteorder("<"))
            raw, code = a.tobytes(), codes[a.dtype.str]
        header[name] = {"dtype": code, "shape": list(np.shape(arr)),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def write_llama(path, tokens, logits, n_ctx) -> np.ndarray:
    """A llama.cpp --kl-divergence-base file from the DESIGN.md description; returns the
    log-probabilities it encodes (decoded back)."""
    n_vocab = logits.shape[1]
    n_chunk = len(tokens) // n_ctx
    nv = 2 * ((n_vocab + 1) // 2) + 4
    decoded = []
    with open(path, "wb") as f:
        f.write(b"_logits_" + struct.pack("<I", n_ctx) + struct.pack("<i", n_vocab)
                + struct.pack("<i", n_chunk))
        f.write(np.asarray(tokens, dtype="<i4").tobytes())
        for row in logits.astype(np.float64):
            mx = row.max()
            mn = max(row.min(), mx - 16)
            lse = np.log(np.exp(row - mx).sum())
            scale = np.float32((mx - mn) / 65535)
            min_lp = np.float32(mn - mx - lse)
            q = np.clip(np.rint((row - mn) / scale), 0, 65535).astype("<u2")
            pad = np.zeros(nv - 4 - n_vocab, dtype="<u2")
            f.write(np.array([scale, min_lp], "<f4").tobytes() + q.tobytes() + pad.tobytes())
            decoded.append(scale * q.astype(np.float32) + min_lp)
    return np.array(decoded)


@pytest.fixture(scope="module")
def mc_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mc")
    rng = np.random.default_rng(11)
    q = rng.normal(-2, 1, size=(37, 1100)).astype(np.float32)
    p = (q + rng.normal(0, 0.4, size=q.shape)).astype(np.float32)
    m = rng.random(q.shape) < 0.7
    m[5] = False  # a row without tokens
    np.save(d / "q.npy", q)
    np.save(d / "p.npy", p)
    np.save(d / "m.npy", m)
    return d, q, p, m


@pytest.mark.parametrize("limit", [1, 256 << 20])
def test_kl_mc_file_equals_in_memory(mc_files, limit):
    d, q, p, m = mc_files
    ref = fastkl.kl_mc_stats(q, p, mask=m)
    rep = fastkl.kl_mc_file(d / "q.npy", d / "p.npy", mask=d / "m.npy", memory_limit=limit)
    assert rep.n == ref.n
    for f in ("mean", "std", "sem"):
        assert getattr(rep, f) == pytest.approx(getattr(ref, f), rel=1e-12)
    assert rep.value == rep.mean
    assert rep.to_dict()["ci95"] == pytest.approx(list(ref.ci95), rel=1e-12)


@pytest.mark.parametrize("red", ["sum", "token-mean", "seq-mean-token-mean",
                                 "seq-mean-token-sum"])
def test_kl_mc_file_reductions(mc_files, red):
    d, q, p, m = mc_files
    kw = dict(mask=m, clamp_log_ratio=(-1, 1), clamp_value=(-0.5, 0.5))
    ref = fastkl.kl_mc(q, p, "k3", reduction=red, **kw)
    kw["mask"] = d / "m.npy"
    rep = fastkl.kl_mc_file(str(d / "q.npy"), str(d / "p.npy"), "k3", reduction=red,
                            memory_limit=1, **kw)
    assert rep.value == pytest.approx(ref, rel=1e-12)


def test_kl_mc_file_options_and_arrays(mc_files, tmp_path):
    d, q, p, m = mc_files
    iw = np.full(q.shape, 0.1, dtype=np.float32)
    np.save(tmp_path / "iw.npy", iw)
    ref = fastkl.kl_mc_stats(q, p, "k1", reverse=True, log_iw=iw)
    rep = fastkl.kl_mc_file(d / "q.npy", p, "k1", reverse=True, log_iw=tmp_path / "iw.npy")
    assert rep.mean == pytest.approx(ref.mean, rel=1e-12)
    mm = np.load(d / "q.npy", mmap_mode="r")  # a read-only memmap is paged like a file
    rep2 = fastkl.kl_mc_file(mm, d / "p.npy")
    assert rep2.mean == pytest.approx(fastkl.kl_mc_stats(q, p).mean, rel=1e-12)
    qn = q.copy()
    qn[3, 7] = np.nan
    np.save(tmp_path / "qn.npy", qn)
    assert math.isnan(fastkl.kl_mc_file(tmp_path / "qn.npy", d / "p.npy").mean)
    om = fastkl.kl_mc_file(tmp_path / "qn.npy", d / "p.npy", nan_policy="omit")
    assert om.n_nan == 1 and om.n == q.size - 1
    with pytest.raises(ValueError, match=r"qn.npy: nan_policy='raise'.*\(3, 7\)"):
        fastkl.kl_mc_file(tmp_path / "qn.npy", d / "p.npy", nan_policy="raise")
    with pytest.raises(ValueError, match="reduction"):
        fastkl.kl_mc_file(d / "q.npy", d / "p.npy", reduction="none")


def test_kl_mc_file_float64_1d_big_endian(tmp_path):
    rng = np.random.default_rng(12)
    q = rng.normal(size=30_000).astype(">f8")
    p = (q + rng.normal(0, 0.1, size=q.size)).astype(">f8")
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "p.npy", p)
    rep = fastkl.kl_mc_file(tmp_path / "q.npy", tmp_path / "p.npy", memory_limit=1)
    assert rep.mean == pytest.approx(fastkl.kl_mc_stats(q, p).mean, rel=1e-12)


# --------------------------------------------------------------------------- compare


@pytest.fixture(scope="module")
def logit_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("logits")
    rng = np.random.default_rng(13)
    a = (rng.normal(size=(3, 40, 301)) * 2).astype(np.float32)
    b = (a + rng.normal(scale=0.3, size=a.shape)).astype(np.float32)
    tok = rng.integers(0, 301, size=(3, 40))
    np.save(d / "a.npy", a)
    np.save(d / "b.npy", b)
    np.save(d / "tok.npy", tok)
    np.savez(d / "b_stored.npz", logits=b, tokens=tok)
    np.savez_compressed(d / "b_comp.npz", other=b)
    write_safetensors(d / "b.safetensors", {"logits": b, "tokens": tok.astype(np.int64)})
    return d, a, b, tok


def _in_memory(a, b, tok, T=1.0):
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (fastkl.LogitsAccumulator(temperature=T, keep_values=True)
            .update(a2, b2, tokens=tok.reshape(-1)).result())


@pytest.mark.parametrize("test_name", ["b.npy", "b_stored.npz", "b_comp.npz", "b.safetensors",
                                       "b_stored.npz::logits"])
def test_compare_formats(logit_files, test_name):
    d, a, b, tok = logit_files
    ref = _in_memory(a, b, tok)
    rep = fastkl.compare_logits(d / "a.npy", f"{d}/{test_name}", tokens=d / "tok.npy")
    assert rep.n == 120 and rep.n_tokens == 120
    assert rep.mean == pytest.approx(ref.mean, rel=1e-12)
    assert rep.percentiles == pytest.approx(ref.percentiles, rel=1e-12)
    assert rep.same_top == ref.same_top
    assert rep.ppl_ratio == pytest.approx(ref.ppl_ratio, rel=1e-12)
    assert rep.dp_percentiles == pytest.approx(ref.dp_percentiles, rel=1e-12)
    d2 = rep.to_dict()
    assert d2["extra"]["rows"] == 120 and d2["percentiles"]["99.9"] == rep.percentiles[99.9]
    json.dumps({k: v for k, v in d2.items()})


def test_compare_tokens_from_file_and_small_blocks(logit_files):
    d, a, b, tok = logit_files
    ref = _in_memory(a, b, tok, T=1.5)
    with pytest.warns(UserWarning, match="one row at a time"):
        rep = fastkl.compare_logits(d / "a.npy", d / "b_stored.npz", temperature=1.5,
                                    memory_limit=1, exact_percentiles=True)
    assert rep.n_tokens == 120  # the npz's "tokens" array
    assert rep.mean == pytest.approx(ref.mean, rel=1e-12)
    assert rep.ln_ppl_ratio == pytest.approx(ref.ln_ppl_ratio, rel=1e-12)
    sk = fastkl.compare_logits(a, b, exact_percentiles=False)
    assert not sk.percentiles_exact and sk.n_tokens == 0
    exact_t1 = _in_memory(a, b, tok).percentiles
    for k, v in exact_t1.items():
        assert sk.percentiles[k] == pytest.approx(v, rel=1.5e-3)


def test_compare_bf16_safetensors(tmp_path, logit_files):
    _, a, b, _ = logit_files
    write_safetensors(tmp_path / "b16.safetensors", {"x": b}, bf16=("x",))
    u = b.view("<u4").astype(np.uint64)
    b16 = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype("<u4").view("<f4")
    rep = fastkl.compare_logits(a, tmp_path / "b16.safetensors")
    assert rep.mean == pytest.approx(
        fastkl.kl_logits(a.reshape(-1, 301), b16.reshape(-1, 301), reduction="mean"), rel=1e-6)


def test_compare_llama_file(tmp_path):
    rng = np.random.default_rng(14)
    n_ctx, n_chunk, n_vocab = 12, 4, 101  # odd vocabulary: a padding uint16 per row
    rows = n_chunk * (n_ctx - 1 - n_ctx // 2)
    tokens = rng.integers(0, n_vocab, n_ctx * n_chunk)
    base = (rng.normal(size=(rows, n_vocab)) * 4).astype(np.float32)
    test = (base + rng.normal(scale=0.3, size=base.shape)).astype(np.float32)
    dec = write_llama(tmp_path / "base.kld", tokens, base, n_ctx)
    np.save(tmp_path / "test.npy", test)
    # llama.cpp's semantics: entries at or below log p = -16 carry no probability, the
    # others their stored probability as it is (not renormalized); the test side is the
    # full log-softmax of its logits
    first = n_ctx // 2
    next_tok = np.concatenate([tokens[c * n_ctx + first + 1: c * n_ctx + n_ctx]
                               for c in range(n_chunk)])
    d64 = dec.astype(np.float64)
    t64 = test.astype(np.float64)
    logq = t64 - t64.max(1, keepdims=True)
    logq -= np.log(np.exp(logq).sum(1, keepdims=True))
    kl = np.where(d64 > -16, np.exp(d64) * (d64 - logq), 0.0).sum(1)
    lp = dec[np.arange(rows), next_tok].astype(np.float64)
    lq = fastkl.token_logprobs(test.astype(np.float64), next_tok)
    rep = fastkl.compare_logits(tmp_path / "base.kld", tmp_path / "test.npy", memory_limit=1e9)
    assert rep.n == rows and rep.n_tokens == rows
    assert rep.mean == pytest.approx(kl.astype(np.float64).mean(), rel=1e-6)
    assert rep.ppl_base == pytest.approx(np.exp(-lp.mean()), rel=1e-6)
    assert rep.ppl_test == pytest.approx(np.exp(-lq.mean()), rel=1e-6)
    assert rep.dp_mean == pytest.approx((np.exp(lq) - np.exp(lp)).mean(), rel=1e-5, abs=1e-9)
    assert rep.same_top == pytest.approx((dec.argmax(1) == test.argmax(1)).mean())
    # and close to the exact KL of the unquantized logits (16-bit quantization)
    exact = fastkl.kl_logits(base, test, reduction="mean")
    assert rep.mean == pytest.approx(exact, rel=0.05)
    # the library's own writer encodes the same bytes
    from fastkl.files import write_llama_logits

    write_llama_logits(str(tmp_path / "mine.kld"), tokens, base, n_ctx)
    assert (tmp_path / "mine.kld").stat().st_size == (tmp_path / "base.kld").stat().st_size


# --------------------------------------------------------------------------- bad files


def _llama_bytes(n_ctx=8, n_vocab=10, n_chunk=2):
    nv = 2 * ((n_vocab + 1) // 2) + 4
    rows = n_chunk * (n_ctx - 1 - n_ctx // 2)
    head = b"_logits_" + struct.pack("<Iii", n_ctx, n_vocab, n_chunk)
    return head + np.zeros(n_ctx * n_chunk, "<i4").tobytes() + np.zeros(rows * nv,
                                                                       "<u2").tobytes()


def _st(header: bytes, nbytes: int) -> bytes:
    return struct.pack("<Q", len(header)) + header + bytes(nbytes)


@pytest.mark.parametrize("content,match", [
    (b"_logitz_" + bytes(40), "unknown file format"),
    (b"hello world, not an array", "unknown file format"),
    (_llama_bytes()[:-6], "truncated"),
    (_llama_bytes() + b"xx", "trailing bytes"),
    (_llama_bytes()[:14], "incomplete header"),
    (b"_logits_" + struct.pack("<Iii", 8, -3, 2), "corrupt llama.cpp header"),
    (struct.pack("<Q", 12) + b"{not json!!}", "corrupt safetensors JSON"),
    (_st(b'{"logits": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}', 8),
     "truncated"),
    (_st(b'{"logits": {"dtype": "F32", "shape": [4, 5], "data_offsets": [0, 64]}}', 64),
     "needs 80 bytes"),
    (_st(b'{"logits": {"dtype": "C64", "shape": [4], "data_offsets": [0, 32]}}', 32),
     "unsupported dtype"),
    (b"PK\x03\x04" + bytes(40), "not a valid .npz"),
])
def test_corrupt_files(tmp_path, content, match):
    f = tmp_path / "bad.bin"
    f.write_bytes(content)
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((6, 10), np.float32))
    with pytest.raises(ValueError, match=match) as exc:
        fastkl.compare_logits(f, good)
    assert "bad.bin" in str(exc.value)


def test_truncated_npy_and_shapes(tmp_path):
    a = np.zeros((6, 10), np.float32)
    np.save(tmp_path / "a.npy", a)
    raw = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[:-4])
    (tmp_path / "long.npy").write_bytes(raw + b"\0" * 8)
    with pytest.raises(ValueError, match="t.npy: truncated"):
        fastkl.compare_logits(tmp_path / "a.npy", tmp_path / "t.npy")
    with pytest.raises(ValueError, match="long.npy: has trailing bytes"):
        fastkl.kl_mc_file(tmp_path / "long.npy", tmp_path / "a.npy")
    np.save(tmp_path / "b.npy", np.zeros((6, 11), np.float32))
    with pytest.raises(ValueError, match="shape mismatch.*a.npy.*b.npy"):
        fastkl.compare_logits(tmp_path / "a.npy", tmp_path / "b.npy")
    with pytest.raises(ValueError, match="logp has shape"):
        fastkl.kl_mc_file(tmp_path / "a.npy", tmp_path / "b.npy")
    np.save(tmp_path / "i.npy", np.zeros((6, 10), np.int32))
    with pytest.raises(TypeError, match="i.npy"):
        fastkl.compare_logits(tmp_path / "a.npy", tmp_path / "i.npy")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        fastkl.compare_logits(tmp_path / "a.npy", tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="directory"):
        fastkl.compare_logits(tmp_path, tmp_path / "a.npy")
    np.save(tmp_path / "tok.npy", np.full(6, 99))
    with pytest.raises(ValueError, match="tok.npy: tokens must be in"):
        fastkl.compare_logits(tmp_path / "a.npy", tmp_path / "a.npy",
                              tokens=tmp_path / "tok.npy")
    np.savez(tmp_path / "two.npz", x=a, y=a)
    with pytest.raises(ValueError, match="two.npz: 2 arrays"):
        fastkl.compare_logits(tmp_path / "two.npz", a)
    np.save(tmp_path / "f.npy", np.asfortranarray(a))
    with pytest.raises(ValueError, match="Fortran"):
        fastkl.compare_logits(tmp_path / "f.npy", a)


def test_inputs_not_modified(tmp_path):
    a = np.random.default_rng(15).normal(size=(5, 7))
    b = a[:, ::-1].copy()
    a0, b0 = a.copy(), b.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastkl.compare_logits(a, b, tokens=np.arange(5))
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)
