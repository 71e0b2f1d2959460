"""Evaluation: metric functions, per-task metrics.json + PNGs, and the markdown report.

`python -m whmae.evaluate <reconstruction|phenotypes|segmentation|representation|report>`
(or `whmae-evaluate ...`). Each task's metrics.json schema is documented in its module.
"""
