import os
import tempfile

import pytest

# Blender writes preferences and caches here instead of the home directory; it must be set
# before bpy is imported.
os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="mvdiff-blender-"))


@pytest.fixture
def bpy_empty():
    import bpy

    bpy.ops.wm.read_homefile(use_empty=True)
    return bpy
