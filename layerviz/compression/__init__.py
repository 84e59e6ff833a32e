"""Compression: which layers matter and how a compact recommender keeps them.

- ``config``: every compression job's config (torch-free);
- ``importance`` (RQ1): per-layer criteria from one probe pass, the single-layer ablation and validity;
- ``selection`` (RQ2): strategies that choose the kept layers;
- ``adapters`` and ``compact`` (RQ3): the adapters that join non-contiguous kept layers, and the compact model;
- ``heal``: healing a compact model on the task; ``retention``: a compact model built, trained and measured
  (``layerviz adapt``).
"""
