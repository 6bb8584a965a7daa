"""One interface over every base model a job can run on: noise from latents, timestep, text and depth.

The multi-view pipelines and the denoising loop never ask which model they drive. A *base
model adapter* encodes prompts into a :class:`TextConditioning`, turns per-view depth maps into
the model's control input, and predicts noise for a batch of views:

* :class:`LatentChannelsAdapter` (``sd2_depth``): SD 2 depth, base or inpainting inside the
  trained multi-view UNet; control enters as extra UNet input channels (depth, or mask and
  masked image).
* :class:`ControlNetAdapter` (``sd15_controlnet``, ``sdxl_controlnet``): an SD 1.5 or SDXL UNet
  with an optional depth ``ControlNetModel`` whose residuals are added to the UNet's skips, as in
  diffusers' ``StableDiffusionControlNetPipeline`` and ``StableDiffusionXLControlNetPipeline``.
  SDXL conditions on a second, pooled text embedding and the size "time ids" as well.

``attention_kwargs`` of a call reach the UNet's attention processors as diffusers'
``cross_attention_kwargs``: the way per-call geometry gets to a multi-view attention processor.
Views of a batch never see each other here unless a processor (or the trained CAA blocks) makes
them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from .depth_control import depth_channel, depth_image
from .view_attention import install_view_attention

SD2_DEPTH, SD15_CONTROLNET, SDXL_CONTROLNET = "sd2_depth", "sd15_controlnet", "sdxl_controlnet"


@dataclass
class TextConditioning:
    """A batch's text conditioning: token embeddings, and for SDXL the pooled embedding and time ids."""

    embeds: torch.Tensor  # (B, tokens, width)
    pooled: torch.Tensor | None = None  # (B, width_2): SDXL's pooled text_encoder_2 output
    time_ids: torch.Tensor | None = None  # (B, 6): SDXL's original size, crop corner, target size

    def parts(self) -> tuple[torch.Tensor | None, ...]:
        return self.embeds, self.pooled, self.time_ids

    @classmethod
    def cat(cls, items: Sequence[TextConditioning]) -> TextConditioning:
        """Batches one after the other (the unconditional half first, as the denoising loop wants)."""
        columns = zip(*(item.parts() for item in items), strict=True)
        return cls(*(None if column[0] is None else torch.cat(column) for column in columns))

    def chunk(self, count: int) -> list[TextConditioning]:
        columns = [[None] * count if part is None else part.chunk(count) for part in self.parts()]
        return [TextConditioning(*row) for row in zip(*columns, strict=True)]

    def added_cond_kwargs(self) -> dict[str, torch.Tensor] | None:
        """SDXL's ``added_cond_kwargs`` for the UNet and ControlNet; None for the other families."""
        if self.pooled is None:
            return None
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}


def clip_embeds(tokenizer, text_encoder, prompts: list[str], device, dtype) -> torch.Tensor:
    """The last hidden state of one CLIP text encoder, padded to its full length (SD 1.x and SD 2)."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids)[0].to(dtype)


def clip_conditioning(tokenizer, encoder, prompts, negative, device, dtype):
    """One CLIP encoder's conditioning of the prompts, and of the negative prompts when guided (else None)."""
    text = TextConditioning(clip_embeds(tokenizer, encoder, prompts, device, dtype))
    if negative is None:
        return text, None
    return text, TextConditioning(clip_embeds(tokenizer, encoder, negative, device, dtype))


class BaseModelAdapter(nn.Module):
    """What the denoising loop needs of a base model; subclasses say how their family does it.

    ``task`` is ``"depth"`` when the model takes depth control and ``"panorama"`` when it is
    text-to-image only. ``released`` and ``condition`` describe trained multi-view parts: an
    adapter without them has ``released`` False and ``condition`` None.
    """

    kind: str
    task: str
    released: bool = False
    condition: nn.Module | None = None

    @property
    def trained_multiview(self) -> bool:
        """Whether the model carries trained CAA blocks that read a CAA geometry."""
        return False

    def encode_prompts(
        self, prompts: list[str], negative: list[str] | None, size: tuple[int, int]
    ) -> tuple[TextConditioning, TextConditioning | None]:
        """Conditioning for ``prompts`` and, when guidance runs, for ``negative``; ``size`` is (width, height)."""
        raise NotImplementedError

    def depth_control(self, depths: Sequence[np.ndarray], height: int, width: int, latent_factor: int) -> torch.Tensor:
        """The control input for one depth map per view, on the model's device and dtype."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class LatentChannelsAdapter(BaseModelAdapter):
    """The SD 2 family inside the trained multi-view UNet; control is extra UNet input channels."""

    kind = SD2_DEPTH

    def __init__(self, model: nn.Module, text_encoder: nn.Module, tokenizer):
        super().__init__()
        self.model, self.text_encoder, self.tokenizer = model, text_encoder, tokenizer

    @property
    def task(self) -> str:  # type: ignore[override]
        return self.model.task

    @property
    def released(self) -> bool:  # type: ignore[override]
        return self.model.released

    @property
    def trained_multiview(self) -> bool:
        return True

    @torch.no_grad()
    def encode_prompts(self, prompts, negative, size):
        return clip_conditioning(self.tokenizer, self.text_encoder, prompts, negative, self.device, self.dtype)

    def depth_control(self, depths, height, width, latent_factor):
        size = (height // latent_factor, width // latent_factor)
        return torch.stack([depth_channel(d, *size) for d in depths]).to(self.device, self.dtype)

    def forward(
        self,
        latents: torch.Tensor,
        timestep,
        text: TextConditioning,
        control: torch.Tensor | None = None,
        *,
        geometry=None,
        condition: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        sample = latents if control is None else torch.cat([latents, control], dim=1)
        return self.model(sample, timestep, text.embeds, geometry, condition, cross_attention_kwargs=attention_kwargs)


class ControlNetAdapter(BaseModelAdapter):
    """An SD 1.5 or SDXL UNet with an optional depth ControlNet (None: text to image only).

    ``text_encoders`` / ``tokenizers`` hold one CLIP encoder for SD 1.5 and two for SDXL
    (``CLIPTextModel`` then ``CLIPTextModelWithProjection``). ``conditioning_scale`` multiplies
    the ControlNet's residuals, as diffusers' ``controlnet_conditioning_scale``.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel | None,
        text_encoders: Sequence[nn.Module],
        tokenizers: Sequence,
        conditioning_scale: float = 1.0,
    ):
        super().__init__()
        self.xl = unet.config.addition_embed_type == "text_time"
        if len(text_encoders) != (2 if self.xl else 1) or len(tokenizers) != len(text_encoders):
            raise ValueError("SDXL takes two text encoders and tokenizers, SD 1.5 one of each")
        self.kind = SDXL_CONTROLNET if self.xl else SD15_CONTROLNET
        self.task = "panorama" if controlnet is None else "depth"
        self.unet, self.controlnet = unet, controlnet
        install_view_attention(unet)  # training-free attention across views when a call passes its geometry
        self.text_encoders = nn.ModuleList(text_encoders)
        self.tokenizers = list(tokenizers)
        self.conditioning_scale = conditioning_scale

    @torch.no_grad()
    def encode_prompts(self, prompts, negative, size):
        if not self.xl:
            return clip_conditioning(self.tokenizers[0], self.text_encoders[0], prompts, negative, self.device,
                                     self.dtype)
        return self._encode_xl(prompts, negative, size)

    def _encode_xl(self, prompts, negative, size):
        """diffusers' SDXL prompt encoding (penultimate hidden states of both encoders, the second's
        pooled output); an empty negative prompt becomes zeros, SDXL's ``force_zeros_for_empty_prompt``."""
        from diffusers import StableDiffusionXLPipeline

        encoder, encoder_2 = self.text_encoders
        pipe = StableDiffusionXLPipeline(
            vae=None, text_encoder=encoder, text_encoder_2=encoder_2, tokenizer=self.tokenizers[0],
            tokenizer_2=self.tokenizers[1], unet=None, scheduler=None, add_watermarker=False,
        )
        guided = negative is not None
        no_negative = guided and all(text == "" for text in negative)
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompts, device=self.device, do_classifier_free_guidance=guided,
            negative_prompt=None if no_negative else negative,
        )
        width, height = size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype)
        time_ids = time_ids.repeat(len(prompts), 1)
        text = TextConditioning(embeds.to(self.dtype), pooled.to(self.dtype), time_ids)
        if not guided:
            return text, None
        return text, TextConditioning(negative_embeds.to(self.dtype), negative_pooled.to(self.dtype), time_ids)

    def depth_control(self, depths, height, width, latent_factor):
        if self.controlnet is None:
            raise ValueError("this base model has no ControlNet to take depth")
        return torch.stack([depth_image(d) for d in depths]).to(self.device, self.dtype)

    def forward(
        self,
        latents: torch.Tensor,
        timestep,
        text: TextConditioning,
        control: torch.Tensor | None = None,
        *,
        geometry=None,
        condition: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        if geometry is not None or condition is not None:
            raise ValueError("trained multi-view blocks (CAA geometry, keyframe condition) exist only for SD 2 bases")
        added = text.added_cond_kwargs()
        residuals = {}
        if self.controlnet is not None:
            if control is None:
                raise ValueError("the ControlNet needs a control image per view")
            down, mid = self.controlnet(
                latents, timestep, encoder_hidden_states=text.embeds, controlnet_cond=control,
                conditioning_scale=self.conditioning_scale, added_cond_kwargs=added, return_dict=False,
            )
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(
            latents, timestep, encoder_hidden_states=text.embeds, cross_attention_kwargs=attention_kwargs,
            added_cond_kwargs=added, return_dict=False, **residuals,
        )[0]
