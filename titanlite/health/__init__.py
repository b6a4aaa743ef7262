"""The health monitor: detectors that return verdicts (the loop acts on them), and diagnose."""
