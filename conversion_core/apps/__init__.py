"""Applications built on the plan: checkpoint conversion, the command line, the demo, benchmarks."""
