"""spiral_rt.sampling (see its modules)."""
