"""The models a backend process serves, loaded once and handed to every job.

A :class:`ModelSet` names where each model comes from and loads it on first use: the depth
model (SD 2 depth with CAA blocks and the interpolation module's condition branch) for scene
texturing, and the panorama model (SD 2 base with CAA blocks) for environments. Sources are
hub ids, local diffusers folders or single checkpoint files (:mod:`~backend.models.loading`);
the added blocks come from our safetensors files or a released MVDiffusion ``.ckpt``. ``tiny``
builds small random-weight models in code, for tests and the offline demo.
"""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import catalog, manifest
from .models.loading import load_components
from .models.mv_unet import MultiViewUNet
from .models.released import load_released_checkpoint, use_released_behaviour
from .models.tiny import CAA_WEIGHTS, tiny_multiview, tiny_pipeline
from .models.weights import load_added_weights
from .pipelines.sampling import MultiViewSampler
from .protocol import NO_MULTIVIEW_WEIGHTS
from .sampling_options import MODES
from .validation import InputError

TINY = "tiny"
DEFAULT_DEPTH_MODEL = catalog.default_base_model("depth")
DEFAULT_BASE_MODEL = catalog.default_base_model("base")
NO_WEIGHTS = NO_MULTIVIEW_WEIGHTS  # describe(): the multi-view blocks stay at their identity initialisation
TASKS = {"depth": "depth", "panorama": "base"}  # task -> the SD 2 kind it is built on


@dataclass(frozen=True)
class ModelConfig:
    """Where the models come from and where they run.

    ``depth`` / ``base``: hub id, diffusers folder or checkpoint file of the base models, or
    ``"tiny"``. A folder holding ``depth/`` and ``base/`` (as ``make-tiny-model`` writes) can be
    given as ``root``. ``depth_caa`` / ``panorama_caa``: the added blocks' weights (our
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
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "float16" if torch.cuda.is_available() else "float32"
    offline: bool | None = None
    models_dir: str | None = None

    @classmethod
    def tiny(cls) -> ModelConfig:
        return cls(depth=TINY, base=TINY, device="cpu", dtype="float32")

    def source(self, task: str) -> str:
        kind = TASKS[task]
        if self.root is not None:
            return str(Path(self.root).expanduser() / kind)
        given = self.depth if task == "depth" else self.base
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
        given = self.depth_caa if task == "depth" else self.panorama_caa
        if given is not None:
            return Path(given).expanduser()
        own = Path(source).expanduser() / CAA_WEIGHTS
        if own.is_file():
            return own
        released = catalog.models_dir(self.models_dir) / catalog.TASK_CHECKPOINTS[task]
        return released if released.is_file() else None

    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise InputError("dtype", f"must be float32, float16 or bfloat16, got {self.dtype!r}")
        return getattr(torch, self.dtype)


class ModelSet:
    """Lazily loaded samplers, one per task, shared by the jobs of one process.

    Loading is guarded by a lock: a job and a health check may ask at once.
    """

    def __init__(self, config: ModelConfig | None = None):
        self.config = config or ModelConfig()
        self._samplers: dict[str, MultiViewSampler] = {}
        self._lock = threading.Lock()

    def sampler(self, task: str) -> MultiViewSampler:
        """The sampler for ``"depth"`` or ``"panorama"``, loaded on first use."""
        if task not in TASKS:
            raise InputError("task", f"must be one of {sorted(TASKS)}, got {task!r}")
        with self._lock:
            if task not in self._samplers:
                self._samplers[task] = self._load(task)
            return self._samplers[task]

    def loaded(self) -> dict[str, str]:
        """Task -> source of each model in memory (what the health route reports)."""
        return {task: self.source_label(task) for task in self._samplers}

    def source_label(self, task: str) -> str:
        return TINY if self.config.source(task) == TINY else self.config.source(task)

    def describe(self, task: str) -> dict[str, str]:
        """What the task's model is made of, without loading anything: the base model's source and the
        multi-view weights (a path, ``"tiny"`` for the built-in tiny model's random blocks, or
        ``"none"`` when the blocks stay at identity, i.e. the output is the base model's alone)."""
        if task not in TASKS:
            raise InputError("task", f"must be one of {sorted(TASKS)}, got {task!r}")
        if self.config.source(task) == TINY:
            weights = TINY
        else:
            path = self.config.multiview_weights(task)
            weights = NO_WEIGHTS if path is None else str(path)
        return {"base_model": self.source_label(task), "multiview_weights": weights}

    def default_mode(self, task: str) -> str:
        """The best way this backend ties a task's views together: ``trained`` where multi-view
        weights are loaded (the tiny model's random blocks count), else ``training_free``."""
        return "training_free" if self.describe(task)["multiview_weights"] == NO_WEIGHTS else "trained"

    def resolve_mode(self, task: str, requested: str | None) -> str:
        """The mode a job runs in: the one it asked for, or :meth:`default_mode`.

        ``trained`` without multi-view weights is refused: it would run the blocks at their
        identity, i.e. every view alone, under a name that promises more.
        """
        if requested is None:
            return self.default_mode(task)
        if requested not in MODES:
            raise InputError("mode", f"must be one of {', '.join(MODES)}, got {requested!r}")
        if requested == "trained" and self.default_mode(task) != "trained":
            raise InputError("mode", "'trained' needs multi-view weights, and none are loaded; "
                             "use 'training_free' or install the weights")
        return requested

    def release(self) -> None:
        """Drop every model and give the memory back.

        A multi-view UNet reaches itself through the forward hooks it installs on its own UNet,
        so dropping the last reference leaves a cycle that only the garbage collector frees:
        collect first, or the weights stay allocated (and the CUDA cache keeps their blocks).
        """
        with self._lock:
            self._samplers.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load(self, task: str) -> MultiViewSampler:
        kind = TASKS[task]
        source = self.config.source(task)
        device, dtype = self.config.device, self.config.torch_dtype()
        if source == TINY:
            pipe = tiny_pipeline(kind)
            model = tiny_multiview(kind, pipe.unet)
            parts = (pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
        else:
            components = load_components(source, kind, offline=self.config.offline, dtype=dtype, device=device)
            model = MultiViewUNet(components.unet, task, with_condition=task == "depth")
            self._load_added(model, task, source)
            parts = (components.vae, components.text_encoder, components.tokenizer, components.scheduler)
        model = model.to(device, dtype).eval()
        vae, text_encoder, tokenizer, scheduler = parts
        return MultiViewSampler(model, vae.to(device, dtype), text_encoder.to(device, dtype), tokenizer, scheduler)

    def _load_added(self, model: MultiViewUNet, task: str, source: str) -> None:
        field = "depth_caa" if task == "depth" else "panorama_caa"
        path = self.config.multiview_weights(task)
        if path is None:
            return
        if not path.is_file():
            raise InputError(field, f"no such file: {path}")
        if path.suffix == ".safetensors":
            load_added_weights(model, path)
            return
        if path.parent == catalog.models_dir(self.config.models_dir):
            manifest.check(path, field)
        report = load_released_checkpoint(model, path)
        use_released_behaviour(model, report)
