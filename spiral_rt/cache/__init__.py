"""spiral_rt.cache (see its modules)."""
