"""Make the backend's Python environment from a checkout: ``python3 scripts/install_backend.py [--prefix DIR]``.

The installer itself is ``mvdiff_blender/install_backend.py`` (standard library only), which ships
in the extension zip so that the add-on's *Install Backend* button can run it; this wrapper keeps
the command that a checkout's users and CI type. ``--help`` lists the options.
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parent.parent / "mvdiff_blender" / "install_backend.py"),
                   run_name="__main__")
