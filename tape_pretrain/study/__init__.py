"""Studies: grids of runs (encodings x sizes x seeds), resumable, aggregated into RESULTS.md and plots."""
