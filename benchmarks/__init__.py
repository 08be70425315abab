"""One script per question, each run as a module from the repository root:
``python -m benchmarks.<script> --help``. Results that BENCHMARKS.md cites are in ``benchmarks/results/``."""
