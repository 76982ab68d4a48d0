"""Benchmark lncRNA predictors against peer tools (CPAT, CPC2); see README.md."""
