"""Retrieval over part features: neighbourhood search (Eq. 3, :mod:`orgnn.retrieval.search`)
and evaluation (CMC, mAP, mINP, re-ranking, :mod:`orgnn.retrieval.metrics`).

Imports only :mod:`orgnn.io` of ours (and :mod:`orgnn.distributed`).
"""
