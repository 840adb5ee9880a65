"""The benchmark harness behind `ssm-split bench` and `benchmarks/` (not a public API)."""
