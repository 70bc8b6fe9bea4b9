"""Library code of ``evaluate`` and ``bench-quality``: metrics, reports, benchmarks."""
