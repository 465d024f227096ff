"""Headless core of napari-uda: volumes, preprocessing, models, inference, metrics, training.

Nothing here imports Qt or napari.
"""
