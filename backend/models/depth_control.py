"""Per-view depth as each kind of base model reads it.

SD 2 depth takes depth as a fifth UNet input channel at latent size; a depth ControlNet takes it
as an RGB image at pixel size. Both want what the monocular estimators they were trained on
produce: inverse depth (near surfaces high), normalised per view. Invalid pixels (depth <= 0:
background, sky) are marked where the model has a marker (SD 2's released ``-2``) and are the
farthest value otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

INVALID_DEPTH_CHANNEL = -2.0


def normalised_inverse_depth(depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values in [0, 1] from far to near, valid mask); 0 where invalid. A flat view is all 0."""
    depth = np.asarray(depth, dtype=np.float32)
    valid = depth > 0
    inverse = np.zeros_like(depth)
    inverse[valid] = 1.0 / depth[valid]
    out = np.zeros_like(depth)
    if valid.any():
        low, high = inverse[valid].min(), inverse[valid].max()
        span = high - low if high > low else 1.0
        out[valid] = (inverse[valid] - low) / span
    return out, valid


def depth_channel(depth: np.ndarray, latent_height: int, latent_width: int) -> torch.Tensor:
    """The released depth conditioning: min-max normalised inverse depth in [-1, 1], -2 where invalid.

    Inverse depth puts near surfaces high, like the monocular estimates SD 2 depth was trained on.
    It is downsampled to the latent size by nearest sampling, so invalid pixels never blend in.
    """
    values, valid = normalised_inverse_depth(depth)
    channel = np.where(valid, 2.0 * values - 1.0, INVALID_DEPTH_CHANNEL).astype(np.float32)
    tensor = torch.from_numpy(channel)[None, None]
    return F.interpolate(tensor, size=(latent_height, latent_width), mode="nearest")[0]


def depth_image(depth: np.ndarray) -> torch.Tensor:
    """A depth ControlNet's input: (3, H, W) in [0, 1], normalised inverse depth in every channel.

    This is what diffusers' ControlNet pipelines make of a depth picture (RGB scaled to [0, 1],
    not normalised to [-1, 1]); invalid pixels are black, the farthest depth.
    """
    values, _ = normalised_inverse_depth(depth)
    return torch.from_numpy(values)[None].expand(3, -1, -1).contiguous()
