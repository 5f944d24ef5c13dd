"""The fastkl command: mc and compare outputs (llama.cpp labels, JSON), --help, exit codes and
one-line errors for bad files, --plot."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import fastkl
from fastkl.cli import main

LLAMA_LABELS = ["Mean    KLD:", "Maximum KLD:", "99.9%   KLD:", "99.0%   KLD:", "95.0%   KLD:",
                "90.0%   KLD:", "Median  KLD:", "10.0%   KLD:", " 5.0%   KLD:", " 1.0%   KLD:",
                " 0.1%   KLD:", "Minimum KLD:"]
TOKEN_LABELS = ["Mean    Δp:", "Maximum Δp:", "99.9%   Δp:", "Median  Δp:", "Minimum Δp:",
                "RMS Δp    :", "Same top p:", "Mean PPL(Q)", "Mean PPL(base)",
                "Mean ln(PPL(Q)/PPL(base))", "Mean PPL(Q)/PPL(base)"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(21)
    a = (rng.normal(size=(64, 50)) * 2).astype(np.float32)
    b = (a + rng.normal(scale=0.3, size=a.shape)).astype(np.float32)
    np.save(d / "a.npy", a)
    np.save(d / "b.npy", b)
    np.save(d / "tok.npy", rng.integers(0, 50, 64))
    q = rng.normal(size=5000)
    np.save(d / "q.npy", q)
    np.save(d / "p.npy", q + rng.normal(0, 0.2, size=q.size))
    np.save(d / "m.npy", rng.random(5000) < 0.5)
    (d / "bad.npy").write_bytes((d / "a.npy").read_bytes()[:200])
    return d


def run(capsys, *argv):
    rc = main([str(x) for x in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _value(out: str, label: str) -> float:
    line = next(ln for ln in out.splitlines() if ln.startswith(label))
    return float(re.findall(r"-?\d+\.\d+", line[len(label):])[0])


def test_compare_text(files, capsys):
    rc, out, err = run(capsys, "compare", files / "a.npy", files / "b.npy")
    assert rc == 0 and err == ""
    for lab in LLAMA_LABELS + ["Same top p:"]:
        assert any(ln.startswith(lab) for ln in out.splitlines()), lab
    rep = fastkl.compare_logits(files / "a.npy", files / "b.npy")
    assert _value(out, "Mean    KLD:") == pytest.approx(rep.mean, abs=1e-6)
    assert re.search(r"Mean    KLD: +\d+\.\d{6} ± +\d+\.\d{6}$", out, re.M)
    assert _value(out, "Same top p:") == pytest.approx(100 * rep.same_top, abs=1e-3)
    assert "Δp" not in out


def test_compare_tokens_json_plot(files, capsys, tmp_path):
    rc, out, _ = run(capsys, "compare", files / "a.npy", files / "b.npy", "--tokens",
                     files / "tok.npy", "--temperature", "1.3")
    assert rc == 0
    for lab in TOKEN_LABELS:
        assert lab in out, lab
    rc, out, _ = run(capsys, "compare", files / "a.npy", files / "b.npy", "--tokens",
                     files / "tok.npy", "--json")
    d = json.loads(out)
    rep = fastkl.compare_logits(files / "a.npy", files / "b.npy", tokens=files / "tok.npy")
    assert d["mean"] == pytest.approx(rep.mean) and d["n_tokens"] == 64
    assert d["percentiles"]["50"] == pytest.approx(rep.percentiles[50.0])
    pytest.importorskip("matplotlib")
    png = tmp_path / "kld.png"
    rc, _, err = run(capsys, "compare", files / "a.npy", files / "b.npy", "--tokens",
                     files / "tok.npy", "--plot", png)
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.iterdir()) == [png]  # no temporary left behind


def test_mc_text_and_json(files, capsys):
    q, p, m = (np.load(files / f) for f in ("q.npy", "p.npy", "m.npy"))
    ref = fastkl.kl_mc_stats(q, p, "k1", reverse=True, mask=m)
    rc, out, _ = run(capsys, "mc", files / "q.npy", files / "p.npy", "--estimator", "k1",
                     "--reverse", "--mask", files / "m.npy", "--json")
    assert rc == 0
    d = json.loads(out)
    assert d["mean"] == pytest.approx(ref.mean, rel=1e-12)
    assert d["sem"] == pytest.approx(ref.sem, rel=1e-12)
    assert d["n"] == ref.n and d["ci95"] == pytest.approx(list(ref.ci95), rel=1e-12)
    rc, out, _ = run(capsys, "mc", files / "q.npy", files / "p.npy")
    assert rc == 0 and "Mean    KL:" in out and "95% CI" in out


@pytest.mark.parametrize("argv,match", [
    (["compare", "{d}/a.npy", "{d}/bad.npy"], r"bad\.npy: truncated"),
    (["compare", "{d}/a.npy", "{d}/nope.npy"], r"nope\.npy: no such file"),
    (["compare", "{d}/a.npy", "{d}/q.npy"], "shape mismatch"),
    (["compare", "{d}/a.npy", "{d}/b.npy", "--temperature", "0"], "temperature"),
    (["mc", "{d}/q.npy", "{d}/a.npy"], "shape"),
    (["mc", "{d}/q.npy", "{d}/bad.npy"], r"bad\.npy"),
    (["mc", "{d}/q.npy", "{d}/p.npy", "--estimator", "k2", "--reverse"], "reverse"),
])
def test_errors_one_line(files, capsys, argv, match):
    rc, out, err = run(capsys, *[a.format(d=files) for a in argv])
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and re.search(match, err)
    assert err.startswith("fastkl ")


def test_plot_bad_destination(files, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    rc, _, err = run(capsys, "compare", files / "a.npy", files / "b.npy", "--plot",
                     tmp_path / "no" / "such" / "dir.png")
    assert rc == 1 and "cannot write" in err


def test_help_lists_commands_and_examples():
    r = subprocess.run([sys.executable, "-m", "fastkl", "--help"], capture_output=True,
                       text=True, check=True)
    for cmd in ("demo", "backends", "mc", "compare"):
        assert cmd in r.stdout
    for cmd in ("mc", "compare"):
        r = subprocess.run([sys.executable, "-m", "fastkl", cmd, "--help"], capture_output=True,
                           text=True, check=True)
        assert "examples:" in r.stdout and f"fastkl {cmd} " in r.stdout
