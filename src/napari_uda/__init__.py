"""napari-uda: adapt MRI segmentation models to a new scanner without labels, live in napari."""

__version__ = "0.1.0"
