"""The evidence sweeps (benchmarks/evidence_*.py): a subprocess per run, resumable records, reports."""
