"""The models a backend process serves, loaded once and handed to every job.

A :class:`ModelSet` names where each model comes from and loads it on first use: the depth
model (SD 2 depth with CAA blocks and the interpolation module's condition branch) for scene
texturing, and the panorama model (SD 2 base with CAA blocks) for environments. Sources are
hub ids, local diffusers folders or single checkpoint files (:mod:`~backend.models.loading`);
the added blocks come from our safetensors files or a released MVDiffusion ``.ckpt``. ``tiny``
builds small random-weight models in code, for tests and the offline demo.

``base_kind`` picks the family (:data:`~backend.models.catalog.BASE_KINDS`): ``sd2_depth`` is the
above; ``sd15_controlnet`` and ``sdxl_controlnet`` load one SD 1.5 or SDXL model
(:mod:`~backend.models.base_loading`) that serves both tasks, the depth task through a depth
ControlNet. Those have no trained multi-view blocks.
"""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import catalog, manifest
from .models.base_adapter import SD2_DEPTH, ControlNetAdapter
from .models.base_loading import LoadedBase, load_controlnet, load_controlnet_base, with_controlnet
from .models.loading import load_components
from .models.mv_unet import MultiViewUNet
from .models.released import load_released_checkpoint, use_released_behaviour
from .models.tiny import CAA_WEIGHTS, tiny_multiview, tiny_pipeline
from .models.tiny_bases import TINY_SHAPE_OF_KIND, tiny_controlnet_base
from .models.weights import load_added_weights
from .pipelines.sampling import MultiViewSampler
from .protocol import NO_MULTIVIEW_WEIGHTS
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

    ``base_kind`` (``sd2_depth``, ``sd15_controlnet``, ``sdxl_controlnet``): the family. For the
    ControlNet kinds ``model`` is the SD 1.5 / SDXL model (hub id, folder, single file or
    ``"tiny"``; ``None``: the catalog's, its copy in the models folder when downloaded) and
    ``controlnet`` its depth ControlNet (``None`` likewise); ``model_config`` /
    ``controlnet_config`` give the configs of single files. ``depth``, ``base``, ``root`` and the
    ``*_caa`` weights are then unused.
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
    base_kind: str = catalog.DEFAULT_BASE_KIND
    model: str | None = None
    controlnet: str | None = None
    model_config: str | None = None
    controlnet_config: str | None = None

    @classmethod
    def tiny(cls, base_kind: str = catalog.DEFAULT_BASE_KIND) -> ModelConfig:
        return cls(depth=TINY, base=TINY, model=TINY, device="cpu", dtype="float32", base_kind=base_kind)

    @property
    def trained(self) -> bool:
        """Whether the family has trained multi-view blocks (SD 2 only)."""
        return self.family().multiview_weights

    def family(self) -> catalog.BaseFamily:
        if self.base_kind not in catalog.BASE_KINDS:
            raise InputError("base_kind", f"must be one of {', '.join(catalog.BASE_KINDS)}, got {self.base_kind!r}")
        return catalog.BASE_KINDS[self.base_kind]

    def controlnet_source(self) -> str | None:
        """The depth ControlNet of a ControlNet kind (``"tiny"`` with the tiny model); None for SD 2."""
        if self.base_kind == SD2_DEPTH:
            return None
        if self.model == TINY:
            return TINY
        if self.controlnet is not None:
            return self.controlnet
        local = catalog.local_family_models(self.base_kind, self.models_dir)[1]
        return str(local) if local is not None else catalog.default_controlnet(self.base_kind)

    def source(self, task: str) -> str:
        if task not in TASKS:
            raise InputError("task", f"must be one of {sorted(TASKS)}, got {task!r}")
        if not self.trained:
            if self.model is not None:
                return self.model
            local = catalog.local_family_models(self.base_kind, self.models_dir)[0]
            return str(local) if local is not None else catalog.default_family_model(self.base_kind)
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
        if source == TINY or not self.trained:
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
        self._base: LoadedBase | None = None  # the ControlNet kinds' one model, shared by both tasks
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
        family = self.config.family()
        if self.config.source(task) == TINY and family.multiview_weights:
            weights = TINY
        else:
            path = self.config.multiview_weights(task)
            weights = NO_WEIGHTS if path is None else str(path)
        described = {"base_model": self.source_label(task), "multiview_weights": weights,
                     "base_kind": family.kind, "native_view_size": family.view_size}
        controlnet = self.config.controlnet_source()
        if task == "depth" and controlnet is not None:
            described["controlnet"] = controlnet
        return described

    def release(self) -> None:
        """Drop every model and give the memory back.

        A multi-view UNet reaches itself through the forward hooks it installs on its own UNet,
        so dropping the last reference leaves a cycle that only the garbage collector frees:
        collect first, or the weights stay allocated (and the CUDA cache keeps their blocks).
        """
        with self._lock:
            self._samplers.clear()
            self._base = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load(self, task: str) -> MultiViewSampler:
        if not self.config.trained:
            return self._load_controlnet_kind(task)
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

    def _load_controlnet_kind(self, task: str) -> MultiViewSampler:
        """One SD 1.5 / SDXL model for both tasks; the depth task adds the ControlNet, loaded when first needed."""
        config, kind = self.config, self.config.base_kind
        if self._base is None:
            source = config.source(task)
            if source == TINY:
                tiny = tiny_controlnet_base(TINY_SHAPE_OF_KIND[kind], with_controlnet=False)
                self._base = LoadedBase(tiny.adapter, tiny.vae, tiny.scheduler, TINY)
            else:
                self._base = load_controlnet_base(
                    kind, source, None, config=config.model_config, offline=config.offline,
                    dtype=config.torch_dtype(), device=config.device,
                )
        base = self._base
        adapter: ControlNetAdapter = base.adapter
        if task == "depth":
            source = config.controlnet_source()
            if source == TINY:
                net = tiny_controlnet_base(TINY_SHAPE_OF_KIND[kind]).adapter.controlnet
            else:
                offline = catalog.hub_offline() if config.offline is None else config.offline
                net = load_controlnet(source, kind, config.controlnet_config, offline, config.torch_dtype())
            adapter = with_controlnet(adapter, net)
        return MultiViewSampler.from_adapter(adapter, base.vae, base.scheduler)

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
