"""A sweep's results: ``results/<sweep>/*.parquet`` and everything derived from them.

Store (the collect stage):

* :mod:`~frontier.results.schema` — the four tables' columns, types and meanings (rendered into
  docs/results-schema.md), metric directions, value conversion.
* :mod:`~frontier.results.parquet_io` — atomic writes, file metadata, reading back.
* :mod:`~frontier.results.families` — the efficiency family of a point; family order and colours.
* :mod:`~frontier.results.runs` — ``metrics.json`` → runs and cost rows; ``gap_closed``.
* :mod:`~frontier.results.fronts` — Pareto fronts (``frontier.parquet``).
* :mod:`~frontier.results.crossover` — L* between points and families (``crossover.parquet``).
* :mod:`~frontier.results.collect` — the stage: merge, write, mirror the tables to W&B.

Presentation (reads the Parquet files only):

* :mod:`~frontier.results.labels` — short labels, units, words.
* :mod:`~frontier.results.terminal` — ``frontier show``.
* :mod:`~frontier.results.plots` — static PNGs (Snakemake report, docs).
* :mod:`~frontier.results.html` — ``report.html``.
* :mod:`~frontier.results.wandb_report` — ``frontier report --wandb``.
"""
