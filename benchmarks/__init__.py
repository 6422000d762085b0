"""Hand-run benchmarks; each script regenerates its own section of BENCHMARKS.md."""
