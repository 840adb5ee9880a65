"""`ssm-split bench` on DRAM: every strategy runs through the library's Reader, is
verified byte for byte, and its record carries what docs/performance.md promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("nixl")

FIELDS = {"executor", "strategy", "strategy_run", "src_devices", "dst_devices", "copy_limit_gbps",
          "pct_of_copy_limit", "speedup_vs_baseline", "pct_of_transport_ceiling", "transport_ceiling_gbps",
          "device", "versions", "verified", "median_s", "descriptors", "waves", "nbytes"}


def test_bench_runs_every_strategy_through_the_reader_and_verifies_it(tmp_path):
    out = tmp_path / "records.json"
    argv = [sys.executable, "-m", "ssm_split", "bench", "--device", "cpu", "--model", "qwen3.5-0.8b",
            "--layers", "2", "--batch", "6", "--src-tp", "2", "--dst-tp", "1", "--repeats", "2",
            "--warmup", "0", "--staging-mib", "8", "--pack-mib", "8", "--json", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads(done.stdout)
    assert (document["schema"], document["version"]) == ("ssm-split/bench", 1)
    records = {r["strategy"]: r for r in document["records"]}
    assert set(records) == {"baseline", "auto", "direct", "staged", "packed"}
    for name, record in records.items():
        assert FIELDS <= set(record), FIELDS - set(record)
        assert record["executor"] == "Reader" and record["verified"], name
        assert record["median_s"] > 0 and record["pct_of_copy_limit"] > 0
        if name not in ("auto", "baseline"):
            assert record["strategy_run"] == [name]  # a forced strategy is what ran
    assert records["packed"]["waves"] > 1  # 8 MiB of staging for 13 MB: several waves
    assert records["baseline"]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert json.loads(out.read_text()) == document["records"]


def test_bench_on_stacked_pages_moves_every_layer_with_one_page_s_reads(tmp_path):
    """`--pages stacked`: one region whose pages hold every layer; each strategy is
    verified, vLLM's per-layer pattern is skipped with the reason, and the direct strategy
    needs a layer's worth of descriptors where per-layer pages need one set per layer."""
    common = ["--device", "cpu", "--model", "qwen3.5-0.8b", "--layers", "3", "--batch", "4", "--src-tp", "1",
              "--dst-tp", "2", "--repeats", "1", "--warmup", "0", "--staging-mib", "8", "--pack-mib", "8",
              "--json", "--strategies", "baseline,direct,staged,packed"]
    runs = {}
    for pages in ("stacked", "per-layer"):
        done = subprocess.run([sys.executable, "-m", "ssm_split", "bench", *common, "--pages", pages],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[pages] = {r["strategy"]: r for r in json.loads(done.stdout)["records"]}
    stacked, per_layer = runs["stacked"], runs["per-layer"]
    assert "no stacked form" in stacked["baseline"]["skipped"]
    for name in ("direct", "staged", "packed"):
        assert stacked[name]["verified"] and stacked[name]["pages"] == "stacked", name
        assert stacked[name]["nbytes"] == per_layer[name]["nbytes"]  # the same state moved
    assert stacked["direct"]["descriptors"] * 3 == per_layer["direct"]["descriptors"]
