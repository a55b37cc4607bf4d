"""Images, datasets, the HDF5 store, the run folder (journals and merge) and heatmap rendering."""

from fastig.io import places365  # noqa: E402,F401  (registers its dataset layout with fastig.io.datasets)
