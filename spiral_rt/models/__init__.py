"""spiral_rt.models (see its modules)."""
