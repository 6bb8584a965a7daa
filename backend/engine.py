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

import torch

from .models import catalog, manifest
from .models.base_adapter import ControlNetAdapter
from .models.base_loading import LoadedBase, load_controlnet, load_controlnet_base, with_controlnet
from .models.loading import load_components
from .models.mv_unet import MultiViewUNet
from .models.released import load_released_checkpoint, use_released_behaviour
from .models.serving import AUTO, DTYPES, TASKS, TINY, ModelConfig
from .models.tiny import tiny_multiview, tiny_pipeline
from .models.tiny_bases import TINY_SHAPE_OF_KIND, tiny_controlnet_base
from .models.weights import load_added_weights
from .pipelines.sampling import MultiViewSampler
from .protocol import NO_MULTIVIEW_WEIGHTS
from .sampling_options import MODES
from .validation import InputError

NO_WEIGHTS = NO_MULTIVIEW_WEIGHTS  # describe(): the multi-view blocks stay at their identity initialisation


def resolve_device(device: str) -> str:
    """``"auto"``: cuda when this machine has it, else cpu; anything else as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == AUTO else device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``"auto"``: float16 on a GPU, float32 elsewhere; else the named dtype."""
    if dtype == AUTO:
        return torch.float32 if resolve_device(device) == "cpu" else torch.float16
    if dtype not in DTYPES:
        raise InputError("dtype", f"must be auto, {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


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

    @property
    def device(self) -> str:
        """The device the models run on, ``auto`` resolved."""
        return resolve_device(self.config.device)

    @property
    def dtype(self) -> str:
        """The models' dtype name, ``auto`` resolved."""
        return str(resolve_dtype(self.config.dtype, self.config.device)).replace("torch.", "")

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
            self._base = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load(self, task: str) -> MultiViewSampler:
        if not self.config.trained:
            return self._load_controlnet_kind(task)
        kind = TASKS[task]
        source = self.config.source(task)
        device, dtype = self.device, resolve_dtype(self.config.dtype, self.config.device)
        if source == TINY:
            pipe = tiny_pipeline(kind)
            model = tiny_multiview(kind, pipe.unet)
            parts = (pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
        else:
            components = load_components(source, kind, offline=self.config.offline, dtype=dtype, device=device)
            # Outpainting is the panorama design on an inpainting UNet.
            design = "panorama" if task == "outpaint" else task
            model = MultiViewUNet(components.unet, design, with_condition=task == "depth")
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
                    dtype=resolve_dtype(config.dtype, config.device), device=self.device,
                )
        base = self._base
        adapter: ControlNetAdapter = base.adapter
        if task == "depth":
            source = config.controlnet_source()
            if source == TINY:
                net = tiny_controlnet_base(TINY_SHAPE_OF_KIND[kind]).adapter.controlnet
            else:
                offline = catalog.hub_offline() if config.offline is None else config.offline
                net = load_controlnet(source, kind, config.controlnet_config, offline,
                                      resolve_dtype(config.dtype, config.device))
            adapter = with_controlnet(adapter, net)
        return MultiViewSampler.from_adapter(adapter, base.vae, base.scheduler)

    def _load_added(self, model: MultiViewUNet, task: str, source: str) -> None:
        field = f"{task}_caa"
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
