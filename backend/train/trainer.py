"""MVDiffusion's two training stages, with save and resume.

Stage 1 adapts the base model to the data; stage 2 trains the multi-view additions on top of it
(mvdiffusion.md §10):

* ``autoencoder`` (stage 1, part a): the VAE, on single frames (L1 reconstruction plus a small
  KL term). The tiny base model's VAE is random, so its latents would not represent images at
  all; a real SD 2 VAE is kept as it is (steps 0). Afterwards the latent scale is measured and
  written into the VAE's ``scaling_factor``, so latents have unit variance as in SD.
* ``single_view`` (stage 1, part b): the whole UNet on single frames at the data's resolution,
  epsilon-MSE, the depth channel as SD 2 depth takes it.
* ``multi_view`` (stage 2): the UNet, VAE and text encoder frozen (``requires_grad`` off, unlike
  the released code), only the CAA blocks and the interpolation module's condition branch
  trained on whole trajectories, all views of a trajectory sharing one timestep. Steps are
  either keyframe generation (no condition at all, as at inference) or interpolation (the first
  and last view are keyframes: their ground-truth latents and a mask go to the condition branch,
  and the loss covers only the views between them). With ``data.multi_view_train`` set, stage 2
  trains on trajectories of its own that stage 1 never saw.

Two bugs of the released recipe are fixed: prompts are dropped (replaced by the empty prompt
the sampler's negative half uses) at ``prompt_dropout``, so classifier-free guidance has a
learned unconditional branch; and the condition branch never sees latents of views being
generated (the released code fed every view's ground truth to it in generation samples).

The panorama task (``task: "panorama"``) trains the same stages on an SD 2 base UNet (4 input
channels: no depth channel): stage 2 trains only its CAA blocks, every step a generation step
(the panorama model has no condition branch), on views around one centre whose correspondences
are rotation-only (as the panorama pipeline builds them, :func:`sample_geometry`).

Every stage: AdamW with cosine decay, gradient clipping, gradient checkpointing where diffusers
supports it, bf16/fp16 autocast on a GPU. Correspondence geometry comes from the same functions
the keyframe and panorama pipelines use (:func:`sample_geometry`), computed once per sample; a batch
of trajectories is one block-diagonal geometry (:func:`stack_geometry`).

Randomness (batch choice, timesteps, noise, dropout, step kind) is drawn from a generator seeded
by (seed, stage, step), so a resumed run draws exactly what an uninterrupted one would.

Run folder::

    config.json          the recipe (a resumed run must use the same)
    state.json           stage, step, finished stages, seconds per stage, latest checkpoint
    log.jsonl            one line per ``log_every`` steps: stage, step, loss, lr, seconds
    checkpoint-<stage>-<step>/   the stage's trainable weights, optimizer and scheduler state
    model/depth/         the trained model as a diffusers folder (+ caa.safetensors), which
                         ``ModelConfig(root=RUN/model)`` and ``--models RUN/model`` load
                         (``model/base/`` for the panorama task)
    report.json          what the run measured (losses, VAE reconstruction PSNR, seconds)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import write_text as write_atomic
from ..models.tiny import CAA_WEIGHTS
from ..models.weights import load_added_weights
from ..validation import InputError
from .checkpoint import TrainState, optimizer_from_files, optimizer_to_files
from .config import PANORAMA_VIEWS, STAGES, TrainConfig, check_same_recipe
from .geometry import sample_geometry, stack_geometry
from .models import build_models, caa_in_float32, export_model, model_kind
from .prepared import (
    PreparedData,
    drop_prompts,
    encode_latents,
    encode_prompts,
    interpolation_condition,
    prepare_data,
    reconstruction_psnr,
)
from .samples import SampleRange

MODEL_FOLDER = "model"


@dataclass
class Batch:
    """One step's inputs. ``keyframes`` (B * V,) bool: views whose latents condition the step
    (interpolation) and that the loss leaves out; None for generation steps and single frames."""

    stage: str
    step: int
    index: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    dropped: torch.Tensor
    keyframes: torch.Tensor | None = None


class Trainer:
    """Runs the stages of a recipe in a run folder, resuming where the folder's state says.

    ``train_data``: training samples (a sequence of ``MultiViewSample`` of the recipe's task); by
    default the synthetic rooms (depth) or landscapes (panorama) the recipe's ``data`` describes.
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | os.PathLike,
        *,
        train_data: Sequence | None = None,
        multi_view_data: Sequence | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ):
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.say = log or (lambda text: None)
        self.device = _device(config.device)
        self.autocast_dtype = _autocast_dtype(config.mixed_precision, self.device)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / "config.json"
        if config_path.is_file():
            check_same_recipe(config, json.loads(config_path.read_text()), config_path)
        else:
            write_atomic(config_path, config.to_json())
        state_path = self.run_dir / "state.json"
        self.state = TrainState.read(state_path) if state_path.is_file() else TrainState()
        self.models = build_models(config, self.device)
        if self.autocast_dtype is not None:
            caa_in_float32(self.models.model)
        self._load_finished_stages()
        d = config.data
        if train_data is None or (multi_view_data is None and d.multi_view_train):
            rooms = synthetic_samples(config, d.train + d.multi_view_train, "train")
            if train_data is None:
                train_data = SampleRange(rooms, 0, d.train)
            if multi_view_data is None and d.multi_view_train:
                multi_view_data = SampleRange(rooms, d.train, d.train + d.multi_view_train)
        self._samples = {"single": train_data, "multi": multi_view_data if multi_view_data is not None else train_data}
        self._data: dict[str, PreparedData] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_schedule: torch.optim.lr_scheduler.LambdaLR | None = None
        self.grad_scaler: torch.amp.GradScaler | None = None
        self._stage_ready: str | None = None

    # ---------------------------------------------------------------- public
    @property
    def finished(self) -> bool:
        return all(name in self.state.completed for name in STAGES)

    @property
    def model_dir(self) -> Path:
        return self.run_dir / MODEL_FOLDER / model_kind(self.config.task)

    def run(self, max_steps: int | None = None) -> dict:
        """Train the remaining stages (at most ``max_steps`` optimisation steps in this call); returns the report."""
        budget = math.inf if max_steps is None else max_steps
        for name in STAGES:
            if name in self.state.completed:
                continue
            if self.state.stage != name:
                self.state.stage, self.state.step = name, 0
            taken = self._run_stage(name, budget)
            budget -= taken
            if name not in self.state.completed:
                break
        report = self.report()
        if self.finished:
            write_atomic(self.run_dir / "report.json", json.dumps(report, indent=2) + "\n")
        return report

    def report(self) -> dict:
        seconds = {k: round(v, 2) for k, v in self.state.seconds.items()}
        return {
            "run": str(self.run_dir),
            "finished": self.finished,
            "stage": self.state.stage,
            "step": self.state.step,
            "completed": list(self.state.completed),
            "train_seconds": round(sum(self.state.seconds.get(n, 0.0) for n in STAGES), 2),
            "stage_seconds": seconds,
            "device": str(self.device),
            "metrics": self.state.metrics,
            "model": str(self.model_dir) if self.finished else None,
        }

    def data(self, stage: str = "single_view") -> PreparedData:
        """A stage's training trajectories, rendered and encoded on first use (not counted as training time)."""
        key = "multi" if stage == "multi_view" else "single"
        if key == "multi" and self._samples["multi"] is self._samples["single"]:
            key = "single"
        if key not in self._data:
            started = time.perf_counter()
            samples = [self._samples[key][k] for k in range(len(self._samples[key]))]
            data = prepare_data(samples, task=self.config.task)
            data.embeddings = encode_prompts(self.models, data.prompts)
            self._data[key] = data
            self._count_preparation(started)
        return self._data[key]

    def make_batch(self, stage: str, step: int) -> Batch:
        """The inputs of ``stage``'s step ``step``: a function of (seed, stage, step) only."""
        data, cfg = self.data(stage), self.config.stage(stage)
        generator = torch.Generator().manual_seed(_step_seed(self.config.seed, stage, step))
        if stage == "multi_view":
            count, views = data.count, data.views
            size = min(cfg.batch_size, count)
            index = torch.randperm(count, generator=generator)[:size]
            t = torch.randint(0, self._train_timesteps, (size,), generator=generator).repeat_interleave(views)
            noise = torch.randn(size * views, *self._latent_shape, generator=generator)
            dropped = drop_prompts(size, self.config.prompt_dropout, generator).repeat_interleave(views)
            keyframes = None
            interpolation = self.config.task == "depth"  # the panorama model has no condition branch
            if interpolation and torch.rand((), generator=generator) < self.config.multi_view.interpolation_ratio:
                keyframes = torch.zeros(size, views, dtype=torch.bool)
                keyframes[:, 0] = keyframes[:, -1] = True
                keyframes = keyframes.flatten()
            return Batch(stage, step, index, t, noise, dropped, keyframes)
        total = data.count * data.views
        index = torch.randint(0, total, (cfg.batch_size,), generator=generator)
        if stage == "autoencoder":
            # The posterior sample's noise comes from a generator seeded by ``noise``.
            return Batch(stage, step, index, torch.zeros(0, dtype=torch.long), _seed_tensor(generator),
                         torch.zeros(0, dtype=torch.bool))
        t = torch.randint(0, self._train_timesteps, (cfg.batch_size,), generator=generator)
        noise = torch.randn(cfg.batch_size, *self._latent_shape, generator=generator)
        dropped = drop_prompts(cfg.batch_size, self.config.prompt_dropout, generator)
        return Batch(stage, step, index, t, noise, dropped)

    def loss(self, batch: Batch) -> torch.Tensor:
        """The stage's training loss on ``batch`` (with gradients where the stage trains)."""
        self.prepare_stage(batch.stage)
        if batch.stage == "autoencoder":  # float32: the box codec's carrier needs the precision
            return self._autoencoder_loss(batch)
        with self._autocast():
            return self._diffusion_loss(batch)

    def optimise(self, batch: Batch) -> float:
        """One optimisation step on ``batch``: loss, backward, clip, AdamW, schedule. Returns the loss."""
        self.prepare_stage(batch.stage)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self._trainable(batch.stage), self.config.grad_clip)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self.lr_schedule.step()
        return float(loss.detach())

    def prepare_stage(self, stage: str) -> None:
        """Freeze and unfreeze for ``stage``, build its optimizer and schedule, load its checkpoint."""
        if self._stage_ready == stage:
            return
        models, cfg = self.models, self.config.stage(stage)
        data = self.data(stage)
        if stage != "autoencoder" and data.latents is None:
            data.latents = encode_latents(models.vae, data.images) * self.scaling_factor
        if stage == "multi_view" and data.geometry is None:
            self.say("building correspondence geometry for the training samples")
            started = time.perf_counter()
            data.geometry = [sample_geometry(self.config.task, c, d)
                             for c, d in zip(data.cameras, data.depths, strict=True)]
            self._count_preparation(started)
        for module in (models.model, models.vae, models.text_encoder):
            module.requires_grad_(False)
        params = self._trainable(stage)
        for p in params:
            p.requires_grad_(True)
        checkpointing = self.config.gradient_checkpointing
        for module in (models.unet, models.vae):
            if checkpointing:
                module.enable_gradient_checkpointing()
            else:
                module.disable_gradient_checkpointing()
        self._train_mode(stage)
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _cosine(cfg))
        scaled = self.autocast_dtype == torch.float16 and stage != "autoencoder"
        self.grad_scaler = torch.amp.GradScaler("cuda") if scaled else None
        if self.state.stage == stage and self.state.checkpoint:
            self._load_checkpoint(self.run_dir / self.state.checkpoint)
        self._stage_ready = stage

    def _count_preparation(self, started: float) -> None:
        """Data rendering, prompt encoding and geometry: reported apart from the training time."""
        spent = self.state.metrics.get("prepare_seconds", 0.0) + time.perf_counter() - started
        self.state.metrics["prepare_seconds"] = round(spent, 3)

    @property
    def scaling_factor(self) -> float:
        if self.state.scaling_factor is not None:
            return self.state.scaling_factor
        return float(self.models.vae.config.scaling_factor)

    # ---------------------------------------------------------------- stages
    def _run_stage(self, stage: str, budget: float) -> int:
        cfg = self.config.stage(stage)
        if cfg.steps == 0:
            self._finish_stage(stage)
            return 0
        self.data(stage)
        self.prepare_stage(stage)
        start_step, taken = self.state.step, 0
        bar = _progress_bar(self.progress, cfg.steps, start_step, _STAGE_LABELS[stage])
        losses: list[float] = []
        started = time.perf_counter()
        log_path = self.run_dir / "log.jsonl"
        try:
            with open(log_path, "a") as log:
                while self.state.step < cfg.steps and taken < budget:
                    batch = self.make_batch(stage, self.state.step)
                    losses.append(self.optimise(batch))
                    self.state.step += 1
                    taken += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{losses[-1]:.4f}")
                    step = self.state.step
                    if step % self.config.log_every == 0 or step == cfg.steps:
                        elapsed = self.state.seconds.get(stage, 0.0) + time.perf_counter() - started
                        row = {"stage": stage, "step": step, "loss": round(float(np.mean(losses)), 6),
                               "lr": self.lr_schedule.get_last_lr()[0], "seconds": round(elapsed, 3)}
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                        self.state.metrics[f"{stage}_loss"] = row["loss"]
                        losses = []
                    done = step >= cfg.steps
                    if done or taken >= budget or step % self.config.save_every == 0:
                        self.state.seconds[stage] = self.state.seconds.get(stage, 0.0) + time.perf_counter() - started
                        started = time.perf_counter()
                        if done:
                            self._finish_stage(stage)
                            break
                        self._save_checkpoint(stage)
        finally:
            if bar is not None:
                bar.close()
        return taken

    def _autoencoder_loss(self, batch: Batch) -> torch.Tensor:
        data, vae = self.data("autoencoder"), self.models.vae
        x = data.images.flatten(0, 1)[batch.index].to(self.device)
        posterior = vae.encode(x).latent_dist
        generator = torch.Generator().manual_seed(int(batch.noise))
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = (reconstruction.float() - x).abs().mean()
        return loss + self.config.autoencoder.kl_weight * posterior.kl().float().mean()

    def _diffusion_loss(self, batch: Batch) -> torch.Tensor:
        data, models = self.data(batch.stage), self.models
        if batch.stage == "multi_view":
            latents = data.latents[batch.index].flatten(0, 1)
            channels = data.depth_channels[batch.index].flatten(0, 1)
            prompts = data.prompt_index[batch.index].flatten()
            geometry = stack_geometry([data.geometry[int(k)] for k in batch.index], [data.views] * len(batch.index))
            geometry = None if geometry is None else {
                k: v.to(self.device, torch.float32) for k, v in geometry.items()
            }
        else:
            latents = data.latents.flatten(0, 1)[batch.index]
            channels = data.depth_channels.flatten(0, 1)[batch.index]
            prompts = data.prompt_index.flatten()[batch.index]
            geometry = None
        prompts = torch.where(batch.dropped, torch.zeros_like(prompts), prompts)
        embeddings = data.embeddings[prompts].to(self.device)
        latents, noise = latents.to(self.device), batch.noise.to(self.device)
        timesteps = batch.timesteps.to(self.device)
        noisy = models.scheduler.add_noise(latents, noise, timesteps)
        model_input = torch.cat([noisy, channels.to(self.device)], dim=1)
        condition = None
        target_views = slice(None)
        if batch.keyframes is not None:
            condition = interpolation_condition(latents, batch.keyframes.to(self.device))
            target_views = ~batch.keyframes.to(self.device)
        prediction = models.model(model_input, timesteps, embeddings, geometry, condition)
        error = (prediction.float() - noise).pow(2).mean(dim=(1, 2, 3))
        cfg = self.config.stage(batch.stage)
        if cfg.snr_gamma > 0 or cfg.high_noise_weight > 1:
            alphas = models.scheduler.alphas_cumprod.to(self.device)[timesteps]
            inverse_snr = (1 - alphas) / alphas
            if cfg.snr_gamma > 0:
                error = error * torch.clamp(cfg.snr_gamma * inverse_snr, max=1.0)
            if cfg.high_noise_weight > 1:
                error = error * torch.clamp(inverse_snr, 1.0, cfg.high_noise_weight)
        return error[target_views].mean()

    def _trainable(self, stage: str) -> list[nn.Parameter]:
        models = self.models
        if stage == "autoencoder":
            return list(models.vae.parameters())
        if stage == "single_view":
            return list(models.unet.parameters())
        return [p for module in models.model.added_modules().values() for p in module.parameters()]

    def _train_mode(self, stage: str) -> None:
        models = self.models
        models.text_encoder.eval()
        models.vae.train(stage == "autoencoder")
        models.model.eval()
        if stage == "single_view":
            models.unet.train()
        elif stage == "multi_view":
            for module in models.model.added_modules().values():
                module.train()

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                yield

    # ---------------------------------------------------------------- saving
    def _stage_modules(self, stage: str) -> dict[str, nn.Module]:
        if stage == "autoencoder":
            return {"vae": self.models.vae}
        if stage == "single_view":
            return {"unet": self.models.unet}
        return dict(self.models.model.added_modules())

    def _save_checkpoint(self, stage: str) -> None:
        name = f"checkpoint-{stage}-{self.state.step}"
        folder = self.run_dir / name
        partial = self.run_dir / (name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        weights = {f"{prefix}.{key}": value.detach().cpu().contiguous()
                   for prefix, module in self._stage_modules(stage).items()
                   for key, value in module.state_dict().items()}
        save_file(weights, str(partial / "weights.safetensors"))
        tensors, meta = optimizer_to_files(self.optimizer)
        save_file(tensors, str(partial / "optimizer.safetensors"))
        meta["lr_schedule"] = self.lr_schedule.state_dict()
        meta["grad_scaler"] = self.grad_scaler.state_dict() if self.grad_scaler is not None else None
        (partial / "optimizer.json").write_text(json.dumps(meta))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
        previous = self.state.checkpoint
        self.state.checkpoint = name
        write_atomic(self.run_dir / "state.json", self.state.to_json())
        if previous and previous != name:
            shutil.rmtree(self.run_dir / previous, ignore_errors=True)

    def _load_checkpoint(self, folder: Path) -> None:
        weights = load_file(str(folder / "weights.safetensors"))
        for prefix, module in self._stage_modules(self.state.stage).items():
            own = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
            module.load_state_dict(own)
        meta = json.loads((folder / "optimizer.json").read_text())
        tensors = load_file(str(folder / "optimizer.safetensors"))
        self.optimizer.load_state_dict(optimizer_from_files(tensors, meta))
        self.lr_schedule.load_state_dict(meta["lr_schedule"])
        if self.grad_scaler is not None and meta.get("grad_scaler"):
            self.grad_scaler.load_state_dict(meta["grad_scaler"])

    def _finish_stage(self, stage: str) -> None:
        """Export the model with this stage's result, mark the stage done and drop its checkpoint."""
        if stage == "autoencoder" and (self.config.autoencoder.steps > 0 or self.config.model.base == "tiny"):
            self.models.vae.eval()
            data = self.data("autoencoder")
            latents = encode_latents(self.models.vae, data.images)
            scale = 1.0 / float(latents.std())
            self.state.scaling_factor = scale
            self.state.metrics["autoencoder_scaling_factor"] = scale
            self.models.vae.register_to_config(scaling_factor=scale)
            heldout = self._heldout_images()
            self.state.metrics["autoencoder_psnr_train"] = round(reconstruction_psnr(self.models.vae, data.images), 3)
            if heldout is not None:
                self.state.metrics["autoencoder_psnr_heldout"] = round(
                    reconstruction_psnr(self.models.vae, heldout), 3)
        if self.state.scaling_factor is not None:
            self.models.vae.register_to_config(scaling_factor=self.state.scaling_factor)
        for module in (self.models.model, self.models.vae):
            module.eval()
        export_model(self.models, self.model_dir)
        self.state.completed.append(stage)
        previous, self.state.checkpoint = self.state.checkpoint, None
        following = [n for n in STAGES if n not in self.state.completed]
        self.state.stage, self.state.step = (following[0], 0) if following else (stage, self.state.step)
        write_atomic(self.run_dir / "state.json", self.state.to_json())
        if previous:
            shutil.rmtree(self.run_dir / previous, ignore_errors=True)
        self._stage_ready = None

    def _load_finished_stages(self) -> None:
        """On resume: the weights of the stages already finished, from the exported model folder."""
        done = set(self.state.completed)
        if not done:
            return
        folder = self.model_dir
        if "autoencoder" in done:
            self.models.vae.load_state_dict(load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")))
            if self.state.scaling_factor is not None:
                self.models.vae.register_to_config(scaling_factor=self.state.scaling_factor)
        if "single_view" in done:
            self.models.unet.load_state_dict(load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")))
        if "multi_view" in done:
            load_added_weights(self.models.model, folder / CAA_WEIGHTS)

    def _heldout_images(self) -> torch.Tensor | None:
        d = self.config.data
        if self.config.model.base != "tiny" and d.heldout == 0:
            return None
        held = synthetic_samples(self.config, min(d.heldout, 4), "heldout")
        images = np.stack([held[k].images for k in range(len(held))])
        return torch.from_numpy(images).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0

    @property
    def _train_timesteps(self) -> int:
        return int(self.models.scheduler.config.num_train_timesteps)

    @property
    def _latent_shape(self) -> tuple[int, int, int]:
        d = self.config.data
        return (4, d.height // 8, d.width // 8)


_STAGE_LABELS = {
    "autoencoder": "stage 1a autoencoder",
    "single_view": "stage 1b single-view UNet",
    "multi_view": "stage 2 CAA + condition",
}


def synthetic_samples(config: TrainConfig, count: int, split: str) -> Sequence:
    """``count`` procedural samples of the recipe's task and ``data`` (rooms for depth, landscapes for panoramas)."""
    d = config.data
    if config.task == "panorama":
        from .synthetic_panorama import SyntheticPanoramaData

        return SyntheticPanoramaData(count, d.width, d.seed, split, pole_views=d.views > PANORAMA_VIEWS[0])
    from .synthetic import SyntheticDepthData

    return SyntheticDepthData(count, d.views, d.width, d.height, d.seed, split=split, step_deg=d.step_deg)


def _seed_tensor(generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2**62, (), generator=generator)


def _step_seed(seed: int, stage: str, step: int) -> int:
    return int(np.random.SeedSequence([seed, STAGES.index(stage), step]).generate_state(1, np.uint64)[0]) >> 1


def _cosine(cfg) -> Callable[[int], float]:
    """Multiplier of the base rate at each step: linear warmup, then cosine from 1 to ``min_lr / lr``."""
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError("device", f"not a torch device: {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device", "CUDA is not available on this machine")
    return device


def _autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or mode == "no":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _progress_bar(enabled: bool, total: int, initial: int, label: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=label, unit="step", dynamic_ncols=True)
