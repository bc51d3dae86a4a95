"""NeTI Studio benchmarks; run them from the repository root as modules: `python -m benchmarks.run --quick`."""
