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

    ``base_kind`` (``sd2_depth``, ``sd15_controlnet``, ``sdxl_controlnet``): the family. For the
    ControlNet kinds ``model`` is the SD 1.5 / SDXL model (hub id, folder, single file or
    ``"tiny"``; ``None``: the catalog's, its copy in the models folder when downloaded) and
    ``controlnet`` its depth ControlNet (``None`` likewise); ``model_config`` /
    ``controlnet_config`` give the configs of single files. ``depth``, ``base``, ``inpaint``,
    ``root`` and the ``*_caa`` weights are then unused.
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
    base_kind: str = catalog.DEFAULT_BASE_KIND
    model: str | None = None
    controlnet: str | None = None
    model_config: str | None = None
    controlnet_config: str | None = None

    @classmethod
    def tiny(cls, base_kind: str = catalog.DEFAULT_BASE_KIND) -> ModelConfig:
        return cls(depth=TINY, base=TINY, inpaint=TINY, model=TINY, device="cpu", dtype="float32",
                   base_kind=base_kind)

    @property
    def trained(self) -> bool:
        """Whether the family has trained multi-view blocks (SD 2 only)."""
        return self.family().multiview_weights

    def family(self) -> catalog.BaseFamily:
        if self.base_kind not in catalog.BASE_KINDS:
            from ..validation import InputError

            raise InputError("base_kind", f"must be one of {', '.join(catalog.BASE_KINDS)}, got {self.base_kind!r}")
        return catalog.BASE_KINDS[self.base_kind]

    def controlnet_source(self) -> str | None:
        """The depth ControlNet of a ControlNet kind (``"tiny"`` with the tiny model); None for SD 2."""
        if self.trained:
            return None
        if self.model == TINY:
            return TINY
        if self.controlnet is not None:
            return self.controlnet
        local = catalog.local_family_models(self.base_kind, self.models_dir)[1]
        return str(local) if local is not None else catalog.default_controlnet(self.base_kind)

    def source(self, task: str) -> str:
        if task not in TASKS:
            from ..validation import InputError

            raise InputError("task", f"must be one of {sorted(TASKS)}, got {task!r}")
        if not self.trained:
            if self.model is not None:
                return self.model
            local = catalog.local_family_models(self.base_kind, self.models_dir)[0]
            return str(local) if local is not None else catalog.default_family_model(self.base_kind)
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
        if source == TINY or not self.trained:
            return None
        given = {"depth": self.depth_caa, "panorama": self.panorama_caa, "outpaint": self.outpaint_caa}[task]
        if given is not None:
            return Path(given).expanduser()
        own = Path(source).expanduser() / CAA_WEIGHTS
        if own.is_file():
            return own
        released = catalog.models_dir(self.models_dir) / catalog.TASK_CHECKPOINTS[task]
        return released if released.is_file() else None
