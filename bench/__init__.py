"""c3 chat streaming benchmark (not part of the test suite): see docs/benchmarks.md."""
