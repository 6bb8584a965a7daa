"""Where the served models come from and where they run: read by ``serve``, ``texture``, ``panorama``.

Standard library only, so that the command line can build its options (``serve --help``) and the
server its configuration without importing torch. The device and dtype may stay ``"auto"`` here;
:class:`~backend.engine.ModelSet` resolves them when it loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import catalog
from .catalog import CAA_WEIGHTS

AUTO = "auto"
DTYPES = ("float32", "float16", "bfloat16")
TINY = "tiny"
DEFAULT_DEPTH_MODEL = catalog.default_base_model("depth")
DEFAULT_BASE_MODEL = catalog.default_base_model("base")
DEFAULT_INPAINT_MODEL = catalog.default_base_model("inpaint")
TASKS = {"depth": "depth", "panorama": "base", "outpaint": "inpaint"}  # task -> the SD 2 kind it is built on


@dataclass(frozen=True)
class ModelConfig:
    """Where the models come from and where they run.

    ``depth`` / ``base`` / ``inpaint``: hub id, diffusers folder or checkpoint file of the base
    models (``inpaint`` serves panoramas from an image), or ``"tiny"``. A folder holding ``depth/``,
    ``base/`` and ``inpaint/`` (as ``make-tiny-model`` writes) can be given as ``root``.
    ``depth_caa`` / ``panorama_caa`` / ``outpaint_caa``: the added blocks' weights (our
    ``.safetensors`` or a released ``.ckpt``); without them a folder's own ``caa.safetensors``
    is used, then the task's released checkpoint in the models folder (``models_dir``, see
    :mod:`~backend.models.catalog`; its recorded sha256 is checked first), and failing that the
    blocks stay at their identity initialisation. A default hub id is replaced by a copy of any
    catalog model of its kind downloaded into the models folder.
    """

    depth: str = DEFAULT_DEPTH_MODEL
    base: str = DEFAULT_BASE_MODEL
    root: str | None = None
    depth_caa: str | None = None
    panorama_caa: str | None = None
    inpaint: str = DEFAULT_INPAINT_MODEL
    outpaint_caa: str | None = None
    device: str = AUTO  # "auto": cuda when available, else cpu
    dtype: str = AUTO  # "auto": float16 on a GPU, float32 on the CPU
    offline: bool | None = None
    models_dir: str | None = None

    @classmethod
    def tiny(cls) -> ModelConfig:
        return cls(depth=TINY, base=TINY, inpaint=TINY, device="cpu", dtype="float32")

    def source(self, task: str) -> str:
        kind = TASKS[task]
        if self.root is not None:
            return str(Path(self.root).expanduser() / kind)
        given = {"depth": self.depth, "panorama": self.base, "outpaint": self.inpaint}[task]
        if given == catalog.default_base_model(kind):
            local = catalog.local_base_model(kind, self.models_dir)
            if local is not None:
                return str(local)
        return given

    def multiview_weights(self, task: str) -> Path | None:
        """The file the task's added blocks load from, by the order in the class docstring; ``None``: identity."""
        source = self.source(task)
        if source == TINY:
            return None
        given = {"depth": self.depth_caa, "panorama": self.panorama_caa, "outpaint": self.outpaint_caa}[task]
        if given is not None:
            return Path(given).expanduser()
        own = Path(source).expanduser() / CAA_WEIGHTS
        if own.is_file():
            return own
        released = catalog.models_dir(self.models_dir) / catalog.TASK_CHECKPOINTS[task]
        return released if released.is_file() else None
