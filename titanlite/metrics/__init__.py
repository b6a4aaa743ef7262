"""What a run measures and reports: the metric log, the profiler, the validation loss."""
