"""Development tools: benchmarks, experiments, planning and fixtures."""
