"""Smoke test of ``report.py --quick``: the whole pipeline (latency, suites in fresh
processes, tables, plot) runs and writes a report whose tables hold measured rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_report_quick(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(HERE, "report.py"), "--quick",
                          "--budget", "0.05", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "report.md").read_text()
    for heading in ("## Monte Carlo estimators", "## Full-vocabulary ops", "## Thread scaling",
                    "## Import time and first-call latency", "## 16-bit inputs read in place",
                    "Machine: "):
        assert heading in md
    assert "| fastkl numpy | k3 |" in md and "| fastkl numpy | kl |" in md
    assert "| float16 |" in md  # a measured 16-bit row (bfloat16 too with ml_dtypes)
    data = json.loads((tmp_path / "results.json").read_text())
    for run in data["mc"] + data["logits"]:
        assert all(r["status"] == "ok" for r in run["rows"]), run["rows"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "throughput.png").stat().st_size > 10_000
