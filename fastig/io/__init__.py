"""Images, datasets, the HDF5 store, the run folder (journals and merge) and heatmap rendering."""
