"""vitscale data_tools stage."""
