"""The Blender extension's entry point: Blender imports this folder as the add-on package.

The add-on itself lives in ``mvdiff_blender/``; the backend it talks to is the sibling
``backend/`` package, shipped in the same zip so add-on and backend always speak the same
wire format.
"""

from .mvdiff_blender import register, unregister

__all__ = ["register", "unregister"]
