"""Evaluations beyond val loss: diagnostics, multi-length eval, samples, downstream, inference cost."""
