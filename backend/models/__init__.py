"""Diffusion models: loading Stable Diffusion 2 components and building tiny stand-ins for tests.

Submodules import torch, diffusers and transformers; this package itself imports nothing heavy,
so ``python -m backend --help`` and the Blender add-on can import ``backend`` cheaply.
"""
