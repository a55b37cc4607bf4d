"""Images, datasets, the HDF5 store and heatmap rendering."""
