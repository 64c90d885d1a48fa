"""spiral_rt."""
