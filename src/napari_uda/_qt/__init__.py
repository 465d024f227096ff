"""napari dock widgets (the only part of napari-uda that imports Qt)."""
