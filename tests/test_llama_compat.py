"""`fastkl compare` against llama.cpp's `llama-perplexity --kl-divergence`: an independent
re-implementation of tools/perplexity/perplexity.cpp (the base-file writer, the per-row
`log_softmax` against a base row, the `kl_divergence` report with its formulas and printf
formats), written here from the C++ in its own float32 / double arithmetic, row by row and
with sequential double sums as the C++ runs them. fastkl's report must print the same text.

C's `expf` is emulated as a float64 exp rounded to float32 (correctly rounded but for
vanishingly rare ties); no FMA contraction (the x86-64 default build)."""

# the report lines are built with printf-style % formats on purpose: llama.cpp's own strings
# ruff: noqa: UP031
from __future__ import annotations

import json
import math
import re
import struct

import numpy as np
import pytest

import fastkl
from fastkl.cli import main

f32 = np.float32


def expf(x):
    return np.asarray(np.exp(np.asarray(x, dtype=np.float64)), dtype=np.float64).astype(f32)


def seqsum(x) -> float:
    """double sum in index order, as the C++ loops add."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.cumsum(x)[-1]) if x.size else 0.0


# --------------------------------------------------------------------------- the writer


def ref_quantize_row(logits: np.ndarray) -> bytes:
    """perplexity.cpp's `log_softmax(n_vocab, logits, uint16_t *log_prob, tok)` row."""
    x = logits.astype(f32)
    max_logit, min_logit = x[0], x[0]
    max_logit, min_logit = f32(max(max_logit, x.max())), f32(min(min_logit, x.min()))
    min_logit = f32(max(min_logit, f32(max_logit - f32(16))))
    sum_exp = seqsum(expf(x - max_logit))
    log_sum_exp = f32(math.log(sum_exp))
    min_log_prob = f32(f32(min_logit - max_logit) - log_sum_exp)
    scale = f32(f32(max_logit - min_logit) / f32(65535))
    q = np.zeros(x.size, dtype=np.uint16)
    if scale != 0:
        inv_scale = f32(f32(1) / scale)
        # nearest_int: add 1.5 * 2**23 in float, read the low mantissa bits
        val = (inv_scale * (x - min_logit)).astype(f32) + f32(12582912.0)
        i = (val.view(np.int32) & 0x007FFFFF) - 0x00400000
        q = np.where(x > min_logit, i, 0).astype(np.int64).astype(np.uint16)
    pad = b"\0\0" if x.size % 2 else b""
    return np.array([scale, min_log_prob], "<f4").tobytes() + q.astype("<u2").tobytes() + pad


def ref_write(path, tokens, logits, n_ctx) -> None:
    n_chunk = len(tokens) // n_ctx
    with open(path, "wb") as f:
        f.write(b"_logits_" + struct.pack("<Iii", n_ctx, logits.shape[1], n_chunk))
        f.write(np.asarray(tokens, "<i4").tobytes())
        for row in logits:
            f.write(ref_quantize_row(row))


def read_base(path):
    """(n_ctx, n_vocab, n_chunk, tokens, rows of uint16 incl. the 4-entry header)."""
    with open(path, "rb") as f:
        raw = f.read()
    n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", raw[8:20])
    tokens = np.frombuffer(raw[20:20 + 4 * n_ctx * n_chunk], "<i4")
    nv = 2 * ((n_vocab + 1) // 2) + 4
    rows = np.frombuffer(raw[20 + 4 * n_ctx * n_chunk:], "<u2").reshape(-1, nv)
    return n_ctx, n_vocab, n_chunk, tokens, rows


def next_tokens(tokens, n_ctx, n_chunk):
    first = n_ctx // 2
    return np.concatenate([tokens[c * n_ctx + first + 1:(c + 1) * n_ctx]
                           for c in range(n_chunk)]).astype(np.int64)


# --------------------------------------------------------------------------- the report


class Kld:
    """kl_divergence_result: double sums, float max."""

    def __init__(self):
        for k in ("sum_nll", "sum_nll2", "sum_nll_base", "sum_nll_base2", "sum_nll_nll_base",
                  "sum_kld", "sum_kld2", "sum_p_diff", "sum_p_diff2", "sum_p_diff4"):
            setattr(self, k, 0.0)
        self.max_p_diff = f32(0)
        self.n_same_top = 0
        self.count = 0


def ref_row(base_row, logits, tok, kld: Kld):
    """perplexity.cpp's `log_softmax(n_vocab, logits, base_log_prob, tok, kld)`."""
    n_vocab = logits.size
    logits = logits.astype(f32)
    max_logit = logits[0]
    imax = 0
    for i in np.flatnonzero(logits > max_logit):  # strict '>' from i = 1: the first maximum
        if logits[i] > max_logit:
            max_logit, imax = logits[i], int(i)
    sum_exp = seqsum(expf(logits - max_logit))
    log_sum_exp = f32(math.log(sum_exp))
    scale, min_log_prob = base_row[:4].view("<f4").astype(f32)
    q = base_row[4:4 + n_vocab]
    nll = f32(f32(max_logit + log_sum_exp) - logits[tok])
    kld.sum_nll += float(nll)
    kld.sum_nll2 += float(f32(nll * nll))
    nll_base = f32(-f32(f32(scale * f32(q[tok])) + min_log_prob))
    kld.sum_nll_base += float(nll_base)
    kld.sum_nll_base2 += float(f32(nll_base * nll_base))
    kld.sum_nll_nll_base += float(f32(nll * nll_base))
    max_logit = f32(max_logit + log_sum_exp)
    p_log_base = (scale * q.astype(f32)).astype(f32) + min_log_prob
    imax_base = int(np.argmax(p_log_base))  # 'i == 0 || >' keeps the first maximum
    keep = p_log_base > f32(-16.0)
    terms = (expf(p_log_base) * ((p_log_base - logits) + max_logit)).astype(f32)
    s = seqsum(terms[keep])
    kld.sum_kld += s
    kld.sum_kld2 += s * s
    kld.count += 1
    kld.n_same_top += imax == imax_base
    p_diff = f32(expf(-nll) - expf(-nll_base))
    kld.sum_p_diff += float(p_diff)
    p_diff2 = float(f32(p_diff * p_diff))
    kld.sum_p_diff2 += p_diff2
    kld.sum_p_diff4 += p_diff2 * p_diff2
    kld.max_p_diff = max(kld.max_p_diff, abs(p_diff))
    return s, p_diff, nll, nll_base


def mean_and_uncertainty(s, s2, count):
    if count < 1:
        return 0.0, 0.0
    f = s / count
    df = s2 / count - f * f
    df = math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0
    return f, df


def covariance(sa, sb, sab, count):
    if count < 10:
        return 0.0
    return (sab / count - (sa / count) * (sb / count)) / (count - 1)


def ref_percentile(values, fraction):
    fraction = f32(fraction)
    if fraction <= 0:
        return values[0]
    if fraction >= 1:
        return values[-1]
    p = f32(fraction * f32(values.size - 1))
    ip = int(p)
    p = f32(p - f32(ip))
    return f32(f32(f32(f32(1) - p) * values[ip]) + f32(p * values[min(ip + 1, values.size - 1)]))


def ref_median(v):
    n = v.size
    return v[n // 2] if n % 2 else f32(f32(0.5) * f32(v[n // 2] + v[n // 2 - 1]))


def ref_report(base_path, test_logits):
    """Every statistic and the printed lines of `kl_divergence()` (after the chunk table);
    also the lines with the perplexity block's uncertainties computed accurately (two-pass,
    math.fsum) from the same per-row float32 NLLs: llama.cpp's one-pass `sum x² / n - mean²`
    over float products cancels there (most in ln(PPL(Q)/PPL(base)) and what derives from
    it, where the two NLLs correlate), and fastkl keeps the accurate number."""
    n_ctx, n_vocab, n_chunk, tokens, rows = read_base(base_path)
    nxt = next_tokens(tokens, n_ctx, n_chunk)
    kld = Kld()
    kv, pv, nll_t, nll_b = [], [], [], []
    rpc = n_ctx - 1 - n_ctx // 2
    table, table_acc = [], []
    for r in range(rows.shape[0]):
        s, pd, nll, nllb = ref_row(rows[r], test_logits[r], nxt[r], kld)
        kv.append(f32(s))
        pv.append(pd)
        nll_t.append(float(nll))
        nll_b.append(float(nllb))
        if (r + 1) % rpc == 0:
            table.append(chunk_line((r + 1) // rpc, kld, None))
            table_acc.append(chunk_line((r + 1) // rpc, kld, (nll_t, nll_b)))
    kv, pv = np.sort(np.array(kv, f32)), np.sort(np.array(pv, f32))
    n = kld.count
    st = {}
    lp = mean_and_uncertainty(kld.sum_nll, kld.sum_nll2, n)
    st["ppl"] = (math.exp(lp[0]), math.exp(lp[0]) * lp[1])
    lb = mean_and_uncertainty(kld.sum_nll_base, kld.sum_nll_base2, n)
    st["ppl_base"] = (math.exp(lb[0]), math.exp(lb[0]) * lb[1])
    cov = covariance(kld.sum_nll, kld.sum_nll_base, kld.sum_nll_nll_base, n)
    st["cor"] = cov / (lp[1] * lb[1])
    ratio = lp[0] - lb[0]
    ratio_unc = math.sqrt(lp[1] * lp[1] + lb[1] * lb[1] - 2.0 * cov)
    st["ln_ratio"] = (ratio, ratio_unc)
    st["ratio"] = (math.exp(ratio), math.exp(ratio) * ratio_unc)
    ppl_cov = st["ppl"][0] * st["ppl_base"][0] * cov
    st["diff"] = (st["ppl"][0] - st["ppl_base"][0],
                  math.sqrt(st["ppl"][1] ** 2 + st["ppl_base"][1] ** 2 - 2.0 * ppl_cov))
    st["kld"] = mean_and_uncertainty(kld.sum_kld, kld.sum_kld2, n)
    fr = {99.9: "0.999", 99.0: "0.990", 95.0: "0.950", 90.0: "0.900", 75.0: "0.750",
          25.0: "0.250", 10.0: "0.100", 5.0: "0.050", 1.0: "0.010", 0.1: "0.001"}
    st["kld_pct"] = {p: float(ref_median(kv) if p == 50.0 else ref_percentile(kv, f32(fr[p])))
                     for p in (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)}
    st["kld_max"], st["kld_min"] = float(kv[-1]), float(kv[0])
    st["dp"] = mean_and_uncertainty(kld.sum_p_diff, kld.sum_p_diff2, n)
    st["dp_pct"] = {p: float(ref_median(pv) if p == 50.0 else ref_percentile(pv, f32(fr[p])))
                    for p in (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)}
    st["dp_max"], st["dp_min"] = float(pv[-1]), float(pv[0])
    mse = mean_and_uncertainty(kld.sum_p_diff2, kld.sum_p_diff4, n)
    st["rms"] = (math.sqrt(mse[0]), 0.5 / math.sqrt(mse[0]) * mse[1])
    top = kld.n_same_top / n
    st["top"] = (top, math.sqrt(top * (1.0 - top) / (n - 1)))
    st["n"] = n

    def sq(x, y):  # sum of centred products, two-pass, exactly rounded sum
        return math.fsum((a - math.fsum(x) / n) * (b - math.fsum(y) / n)
                         for a, b in zip(x, y, strict=True))
    vt, vb, c = sq(nll_t, nll_t) / (n - 1), sq(nll_b, nll_b) / (n - 1), sq(nll_t, nll_b) / (n - 1)
    dif = [a - b for a, b in zip(nll_t, nll_b, strict=True)]
    vd = sq(dif, dif) / (n - 1)
    a, b = st["ppl"][0], st["ppl_base"][0]
    acc = dict(st)
    acc["ppl"] = (a, a * math.sqrt(vt / n))
    acc["ppl_base"] = (b, b * math.sqrt(vb / n))
    acc["cor"] = c / math.sqrt(vt * vb)
    acc["ln_ratio"] = (st["ln_ratio"][0], math.sqrt(vd / n))
    acc["ratio"] = (st["ratio"][0], st["ratio"][0] * math.sqrt(vd / n))
    acc["diff"] = (st["diff"][0], math.sqrt((a * a * vt + b * b * vb - 2 * a * b * c) / n))
    head = ["chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
            "              Δp RMS            Same top p"]
    return (st, head + table + [""] + report_lines(st),
            head + table_acc + [""] + report_lines(acc))


def chunk_line(i, kld: Kld, accurate) -> str:
    """A row of the running per-chunk table `kl_divergence()` prints after each chunk;
    ``accurate`` = (nll, nll_base) so far: the two uncertainties that cancel, two-pass."""
    n = kld.count
    lp = mean_and_uncertainty(kld.sum_nll, kld.sum_nll2, n)
    lb = mean_and_uncertainty(kld.sum_nll_base, kld.sum_nll_base2, n)
    cov = covariance(kld.sum_nll, kld.sum_nll_base, kld.sum_nll_nll_base, n)
    var = lp[1] * lp[1] + lb[1] * lb[1] - 2.0 * cov
    ppl_unc = math.exp(lp[0]) * lp[1]
    ratio_unc = math.sqrt(var) if var >= 0 else math.nan
    if accurate is not None and n > 10:
        x, y = accurate

        def sd(v):
            m = math.fsum(v) / n
            return math.sqrt(math.fsum((t - m) ** 2 for t in v) / (n - 1) / n)
        ppl_unc = math.exp(lp[0]) * sd(x)
        ratio_unc = sd([t - u for t, u in zip(x, y, strict=True)])
    kl = mean_and_uncertainty(kld.sum_kld, kld.sum_kld2, n)
    mse = mean_and_uncertainty(kld.sum_p_diff2, kld.sum_p_diff4, n)
    rms = math.sqrt(mse[0])
    top = kld.n_same_top / n
    return ("%4d" % i + "    %9.4lf ± %9.4lf" % (math.exp(lp[0]), ppl_unc)
            + "    %10.5lf ± %10.5lf" % (lp[0] - lb[0], ratio_unc)
            + "    %10.5lf ± %10.5lf" % kl
            + "    %6.3lf ± %6.3lf %%" % (100.0 * rms, 100.0 * 0.5 / rms * mse[1])
            + "    %6.3lf ± %6.3lf %%" % (100.0 * top,
                                             100.0 * math.sqrt(top * (1 - top) / (n - 1))))


def report_lines(st) -> list[str]:
    """`kl_divergence()`'s final report, its printf formats in Python's % (the same)."""
    L = []
    L.append("====== Perplexity statistics ======")
    L.append("Mean PPL(Q)                   : %10.6lf ± %10.6lf" % st["ppl"])
    L.append("Mean PPL(base)                : %10.6lf ± %10.6lf" % st["ppl_base"])
    L.append("Cor(ln(PPL(Q)), ln(PPL(base))): %6.2lf%%" % (100.0 * st["cor"]))
    L.append("Mean ln(PPL(Q)/PPL(base))     : %10.6lf ± %10.6lf" % st["ln_ratio"])
    L.append("Mean PPL(Q)/PPL(base)         : %10.6lf ± %10.6lf" % st["ratio"])
    L.append("Mean PPL(Q)-PPL(base)         : %10.6lf ± %10.6lf" % st["diff"])
    L.append("")
    L.append("====== KL divergence statistics ======")
    L.append("Mean    KLD: %10.6lf ± %10.6lf" % st["kld"])
    L.append("Maximum KLD: %10.6f" % st["kld_max"])
    for p, head in ((99.9, "99.9%   "), (99.0, "99.0%   "), (95.0, "95.0%   "),
                    (90.0, "90.0%   "), (50.0, "Median  "), (10.0, "10.0%   "),
                    (5.0, " 5.0%   "), (1.0, " 1.0%   "), (0.1, " 0.1%   ")):
        L.append("%sKLD: %10.6f" % (head, st["kld_pct"][p]))
    L.append("Minimum KLD: %10.6f" % st["kld_min"])
    L.append("")
    L.append("====== Token probability statistics ======")
    L.append("Mean    Δp: %6.3lf ± %5.3lf %%" % (100.0 * st["dp"][0], 100.0 * st["dp"][1]))
    L.append("Maximum Δp: %6.3lf%%" % (100.0 * st["dp_max"]))
    for p, head in ((99.9, "99.9%   "), (99.0, "99.0%   "), (95.0, "95.0%   "),
                    (90.0, "90.0%   "), (75.0, "75.0%   "), (50.0, "Median  "),
                    (25.0, "25.0%   "), (10.0, "10.0%   "), (5.0, " 5.0%   "),
                    (1.0, " 1.0%   "), (0.1, " 0.1%   ")):
        L.append("%sΔp: %6.3lf%%" % (head, 100.0 * st["dp_pct"][p]))
    L.append("Minimum Δp: %6.3lf%%" % (100.0 * st["dp_min"]))
    L.append("RMS Δp    : %6.3lf ± %5.3lf %%" % (100.0 * st["rms"][0], 100.0 * st["rms"][1]))
    L.append("Same top p: %6.3lf ± %5.3lf %%" % (100.0 * st["top"][0], 100.0 * st["top"][1]))
    return L


def same_report(got: list[str], llama: list[str], accurate: list[str]) -> None:
    """``got`` prints llama.cpp's lines digit for digit; in the chunk table and the
    perplexity block a line may instead equal the accurately computed one, where llama.cpp's
    differs from it by its cancellation only (the values before '±' always equal)."""
    assert len(got) == len(llama)
    flexible = llama.index("====== Perplexity statistics ======") + 7
    for i, (g, w, a) in enumerate(zip(got, llama, accurate, strict=True)):
        if g == w:
            continue
        assert i < flexible and g == a, (i, g, w, a)
        num = r"-?(?:\d+\.\d+|nan)"
        for gv, wv in zip(re.findall(num, g), re.findall(num, w), strict=True):
            # llama.cpp's variance can even come out negative (its sqrt: -nan)
            assert wv == "nan" or float(gv) == pytest.approx(float(wv), rel=1e-3, abs=2e-5), \
                (g, w)


# --------------------------------------------------------------------------- data


N_CTX, N_CHUNK, N_VOCAB = 64, 5, 997  # 31 rows a chunk, 155 rows; odd vocabulary (padding)


def make_logits(seed, n_rows, noise):
    """Model-like base logits (the observed next token likely), and a test model's."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, N_VOCAB, N_CTX * N_CHUNK)
    nxt = next_tokens(tokens, N_CTX, N_CHUNK)
    base = rng.normal(size=(n_rows, N_VOCAB)) * 2.5
    base[np.arange(n_rows), nxt] += rng.uniform(4, 16, n_rows)
    base[::7, :300] -= 14  # rows with many entries under the -16 floor
    base = base.astype(f32)
    test = (base + rng.normal(scale=noise, size=base.shape)).astype(f32)
    return tokens, base, test


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    n_rows = N_CHUNK * (N_CTX - 1 - N_CTX // 2)
    tokens, base, test = make_logits(5, n_rows, 0.15)
    ref_write(d / "base.kld", tokens, base, N_CTX)
    ref_write(d / "test.kld", tokens, test, N_CTX)
    np.save(d / "test.npy", test)
    np.save(d / "same.npy", base)  # the base model itself: per-row KL is quantization noise
    return d, base, test


def fastkl_lines(capsys, base, test, *opts):
    rc = main(["compare", str(base), str(test), *opts])
    out, err = capsys.readouterr()
    assert rc == 0 and err == "", err
    lines = out.splitlines()
    assert lines[0].startswith("fastkl compare:") and lines[1] == ""
    return lines[2:]


# --------------------------------------------------------------------------- tests


def test_writer_quantizes_like_llama_cpp(tmp_path):
    rng = np.random.default_rng(1)
    n_ctx, n_chunk, n_vocab = 10, 3, 301
    rows = n_chunk * (n_ctx - 1 - n_ctx // 2)
    logits = (rng.normal(size=(rows, n_vocab)) * rng.uniform(0.1, 8, (rows, 1))).astype(f32)
    logits[0] = 1.5  # all equal: scale 0, every q 0
    logits[1, :3] = [3.0, 3.0, -40.0]  # ties at the maximum, far below the -16 window
    tokens = rng.integers(0, n_vocab, n_ctx * n_chunk)
    fastkl.files.write_llama_logits(str(tmp_path / "mine.kld"), tokens, logits, n_ctx)
    ref_write(tmp_path / "ref.kld", tokens, logits, n_ctx)
    assert (tmp_path / "mine.kld").read_bytes() == (tmp_path / "ref.kld").read_bytes()


def test_report_equals_llama_cpp(data, capsys):
    d, base, test = data
    st, want, accurate = ref_report(d / "base.kld", test)
    rep = fastkl.compare_logits(d / "base.kld", d / "test.npy")
    assert rep.llama_compat and rep.percentiles_exact and rep.n == st["n"]
    assert rep.mean == pytest.approx(st["kld"][0], rel=1e-12)
    assert rep.sem == pytest.approx(st["kld"][1], rel=1e-9)
    assert rep.maximum == st["kld_max"] and rep.minimum == st["kld_min"]
    assert rep.percentiles == st["kld_pct"]  # float32 values, float32 interpolation: exact
    assert rep.dp_percentiles == st["dp_pct"]
    assert (rep.dp_maximum, rep.dp_minimum) == (st["dp_max"], st["dp_min"])
    assert rep.dp_mean == pytest.approx(st["dp"][0], rel=1e-12)
    assert rep.dp_sem == pytest.approx(st["dp"][1], rel=1e-6)
    assert (rep.ppl_test, rep.ppl_base) == pytest.approx((st["ppl"][0], st["ppl_base"][0]),
                                                         rel=1e-13)
    assert rep.ppl_test_sem == pytest.approx(st["ppl"][1], rel=1e-6)
    assert rep.ln_ppl_ratio == pytest.approx(st["ln_ratio"][0], rel=1e-11)
    assert rep.ln_ppl_ratio_sem == pytest.approx(st["ln_ratio"][1], rel=1e-5)
    assert rep.ppl_diff == pytest.approx(st["diff"][0], rel=1e-12)
    assert rep.ppl_diff_sem == pytest.approx(st["diff"][1], rel=1e-5)
    assert rep.cor_ln_ppl == pytest.approx(st["cor"], rel=1e-6)
    assert rep.rms_dp == pytest.approx(st["rms"][0], rel=1e-7)
    assert (rep.same_top, rep.same_top_sem) == pytest.approx(st["top"], rel=1e-14)
    # the printed text: every line of llama.cpp's per-chunk table and final report, digit
    # for digit (nothing cancels in this data: not even the accurate lines differ)
    assert fastkl_lines(capsys, d / "base.kld", d / "test.npy") == want == accurate


def test_report_safetensors_test_side(data, capsys):
    d, base, test = data
    h = json.dumps({"logits": {"dtype": "F32", "shape": list(test.shape),
                               "data_offsets": [0, test.nbytes]}}).encode()
    (d / "test.safetensors").write_bytes(struct.pack("<Q", len(h)) + h
                                         + test.astype("<f4").tobytes())
    _, want, _ = ref_report(d / "base.kld", test)
    assert fastkl_lines(capsys, d / "base.kld", d / "test.safetensors") == want


def test_negative_kl_rows_kept(data, capsys):
    """The base model against itself: per-row KL is storage noise of either sign; llama.cpp
    keeps the negative values (minimum, percentiles, mean)."""
    d, base, _ = data
    st, want, accurate = ref_report(d / "base.kld", base)
    assert st["kld_min"] < 0
    rep = fastkl.compare_logits(d / "base.kld", d / "same.npy")
    assert rep.minimum == st["kld_min"] < 0
    assert rep.percentiles == st["kld_pct"]
    assert rep.mean == pytest.approx(st["kld"][0], rel=1e-9, abs=1e-15)
    # here the NLLs correlate: llama.cpp's one-pass sums cancel in the uncertainties of the
    # ln ratio (its first chunk: sqrt of a negative number) and what derives from it
    assert want != accurate
    same_report(fastkl_lines(capsys, d / "base.kld", d / "same.npy"), want, accurate)


def forged_base(path, n_vocab, q_rows, tokens, n_ctx, scale=2.0 ** -10, lo=-17.0):
    """A base file with chosen rows: log p = scale * q + lo exactly (q = 1024: -16.0)."""
    nv = 2 * ((n_vocab + 1) // 2) + 4
    with open(path, "wb") as f:
        f.write(b"_logits_" + struct.pack("<Iii", n_ctx, n_vocab, len(tokens) // n_ctx))
        f.write(np.asarray(tokens, "<i4").tobytes())
        for q in q_rows:
            row = np.zeros(nv, "<u2")
            row[:4] = np.array([scale, lo], "<f4").view("<u2")
            row[4:4 + n_vocab] = q
            f.write(row.tobytes())


def test_floor_boundary_and_no_renormalization(tmp_path):
    """Base entries at exactly log p = -16 are dropped, those just above kept; the kept
    probabilities are summed as stored (here their mass exceeds 1: not renormalized)."""
    rng = np.random.default_rng(3)
    n_ctx, n_chunk, n_vocab = 8, 4, 64
    rows = n_chunk * (n_ctx - 1 - n_ctx // 2)
    q = rng.integers(900, 1150, size=(rows, n_vocab)).astype(np.uint16)
    q[:, :9] = [1023, 1024, 1024, 1025, 1026, 0, 2047, 1024, 17 * 1024]  # log p: ... 0.0
    q[::2, 9] = 16 * 1024  # log p = -1
    tokens = rng.integers(0, n_vocab, n_ctx * n_chunk)
    test = rng.normal(size=(rows, n_vocab)).astype(f32)
    np.save(tmp_path / "t.npy", test)
    means = []
    for name, qq in (("b.kld", q), ("b2.kld", np.where(q == 1024, 1025, q))):
        forged_base(tmp_path / name, n_vocab, qq, tokens, n_ctx)
        n_ctx_, _, n_chunk_, toks, raw = read_base(tmp_path / name)
        nxt = next_tokens(toks, n_ctx_, n_chunk_)
        k = Kld()
        vals = np.array([ref_row(raw[r], test[r], nxt[r], k)[0] for r in range(rows)])
        rep = fastkl.compare_logits(tmp_path / name, tmp_path / "t.npy", memory_limit=1e9)
        assert rep.mean == pytest.approx(vals.mean(), rel=1e-12)
        assert rep.maximum == float(f32(vals.max())) and rep.minimum == float(f32(vals.min()))
        means.append(rep.mean)
    # the entries at -16.0 made a difference when moved just above it
    assert means[0] != pytest.approx(means[1], rel=1e-9)


def test_two_base_files_finite_and_close(data):
    """A second base file as the test side: its stored log-probabilities as they are (never
    floored): finite statistics within its storage noise of the logits-based report."""
    d, base, test = data
    two = fastkl.compare_logits(d / "base.kld", d / "test.kld")
    one = fastkl.compare_logits(d / "base.kld", d / "test.npy")
    assert two.llama_compat
    for k in ("mean", "sem", "maximum", "minimum", "ppl_test", "ppl_base", "ln_ppl_ratio",
              "ppl_ratio", "ppl_diff", "dp_mean", "rms_dp", "same_top", "cor_ln_ppl"):
        assert math.isfinite(getattr(two, k)), k
    # 16-bit storage: log q off by at most (max - min) / 65535 / 2 ~ 1.2e-4 per entry
    assert two.mean == pytest.approx(one.mean, abs=3e-4)
    assert two.maximum == pytest.approx(one.maximum, abs=3e-4)
    assert two.percentiles[50.0] == pytest.approx(one.percentiles[50.0], abs=3e-4)
    assert two.ppl_base == one.ppl_base
    assert abs(two.same_top - one.same_top) <= 2 / one.n
    # PPL(Q) from the test file's stored log q of the observed tokens, as they are (tokens
    # under its -16 window read as its floor value: the file holds nothing finer)
    n_ctx, n_vocab, n_chunk, tokens, rows = read_base(d / "test.kld")
    nxt = next_tokens(tokens, n_ctx, n_chunk)
    head = rows[:, :4].copy().view("<f4")
    lq = (head[:, 0] * rows[np.arange(len(nxt)), 4 + nxt].astype(f32)) + head[:, 1]
    assert two.ppl_test == pytest.approx(math.exp(-lq.astype(np.float64).mean()), rel=1e-12)


def test_cli_numbers_are_the_api_numbers(data, capsys):
    d, _, _ = data
    rep = fastkl.compare_logits(d / "base.kld", d / "test.npy")
    lines = fastkl_lines(capsys, d / "base.kld", d / "test.npy")
    text = "\n".join(lines)
    assert f"Mean PPL(Q)-PPL(base)         : {rep.ppl_diff:10.6f} ± {rep.ppl_diff_sem:10.6f}" \
        in text
    assert f"Mean    KLD: {rep.mean:10.6f} ± {rep.sem:10.6f}" in text
    assert f"Minimum KLD: {rep.minimum:10.6f}" in text
    assert f"75.0%   Δp: {100 * rep.dp_percentiles[75.0]:6.3f}%" in text
    assert f"25.0%   Δp: {100 * rep.dp_percentiles[25.0]:6.3f}%" in text
    assert f"Same top p: {100 * rep.same_top:6.3f} ± {100 * rep.same_top_sem:5.3f} %" in text
    # JSON carries the new fields
    rc = main(["compare", str(d / "base.kld"), str(d / "test.npy"), "--json"])
    js = json.loads(capsys.readouterr().out)
    assert rc == 0 and js["llama_compat"] is True
    assert js["ppl_diff"] == rep.ppl_diff and js["dp_percentiles"]["75"] == \
        rep.dp_percentiles[75.0]


def test_float64_test_logits_and_no_mixing(data):
    """float64 test logits: the same arithmetic in float64 (llama.cpp's are float32), close to
    the float32 report; rows of llama.cpp arithmetic and of exact KL never mix."""
    d, base, test = data
    np.save(d / "test64.npy", test.astype(np.float64))
    r64 = fastkl.compare_logits(d / "base.kld", d / "test64.npy")
    r32 = fastkl.compare_logits(d / "base.kld", d / "test.npy")
    assert r64.llama_compat
    assert r64.mean == pytest.approx(r32.mean, rel=1e-5)
    assert r64.ppl_test == pytest.approx(r32.ppl_test, rel=1e-6)
    acc = fastkl.LogitsAccumulator()
    acc._add_llama_block(base[:4], test[:4], False, None, None)
    with pytest.raises(ValueError, match="llama.cpp"):
        acc.update(base[:4], test[:4])
    other = fastkl.LogitsAccumulator().update(base[:4], test[:4])
    with pytest.raises(ValueError, match="llama.cpp"):
        acc.merge(other)


def test_percentile_next_to_an_infinite_row():
    """A row with KL = +inf (P > 0 = Q): the percentiles next to it are not 0 * inf = NaN."""
    import warnings

    from fastkl import _llama

    v = np.array([*range(10), np.inf], dtype=f32)  # 0.9f * 10 rounds to 9.0: weight 0 on inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _llama.percentile(v, 0.9) == 9.0 == ref_percentile(v[:10], f32(1.0))
        assert _llama.percentile(v, 0.999) == np.inf
        assert _llama.median(np.array([1, np.inf], f32)) == np.inf
