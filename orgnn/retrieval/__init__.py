"""Retrieval over part features: neighbourhood search (Eq. 3, :mod:`orgnn.retrieval.search`),
evaluation (CMC, mAP, mINP, re-ranking, :mod:`orgnn.retrieval.metrics`) and the peer rows'
global feature and query expansion (:mod:`orgnn.retrieval.query_expansion`).

Imports only :mod:`orgnn.io` of ours (and :mod:`orgnn.distributed`).
"""
