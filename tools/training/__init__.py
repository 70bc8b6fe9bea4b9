"""Library code of ``train``, ``calibrate`` and ``prior``: data sets, heads, fusion fits."""
