"""``biolit-id bench``: its sections, measurements and report."""
