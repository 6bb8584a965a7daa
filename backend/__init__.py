"""MVDiffusion backend: geometry, multi-view diffusion, texture baking and the job service.

Importing this package is cheap and pulls in neither torch nor diffusers, so that light
modules (the wire protocol, the camera model) stay importable from Blender's Python.
"""

__version__ = "0.1.0"
