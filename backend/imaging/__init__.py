"""Image helpers that outlive a single pipeline: HDR radiance, its tone curves and its files."""
