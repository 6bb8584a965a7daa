"""Geometry that depends only on cameras, depths and meshes: no models, no Blender.

Submodules are imported explicitly (``from backend.geometry import cameras``) so that the
numpy-only ones stay usable without torch.
"""
