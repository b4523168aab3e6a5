"""The reconstruction method: outlier scoring (:mod:`~orgnn.reconstruction.outliers`), θ
calibration (:mod:`~orgnn.reconstruction.calibration`), the validation split
(:mod:`~orgnn.reconstruction.validation`), neighbourhood graphs
(:mod:`~orgnn.reconstruction.graphs`), training (:mod:`~orgnn.reconstruction.training`) and
train → reconstruct → evaluate with the ablation table (:mod:`~orgnn.reconstruction.pipeline`).

Imports :mod:`orgnn.io`, :mod:`orgnn.retrieval` and :mod:`orgnn.nn`; never the command line.
"""
