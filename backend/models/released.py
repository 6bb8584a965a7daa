"""Load the released MVDiffusion checkpoints into a :class:`~backend.models.mv_unet.MultiViewUNet`.

The released files (``pano.ckpt``, ``pano_outpaint.ckpt``, ``depth_gen.ckpt``) are PyTorch-Lightning
checkpoints of the whole training module: weights under ``["state_dict"]``, named after the
released code's attributes (mvdiffusion.md §11). The names below are derived from that code, not
yet checked against the files themselves, so they live in two tables that are easy to correct
(:data:`KEY_MAP`, :data:`CAA_NAMES`), and every load reports each key it could not place
(:class:`LoadReport`) instead of dropping it quietly.

Released name -> ours (``{i}`` is a level index 0..3, ``{last}`` the last one; ``{attn}`` is ``""``
for the panorama design, whose blocks are a bare attention module, and ``"attn1."`` for the depth
design, whose blocks wrap it next to a ResNet):

=================================================  ===========================================
``mv_base_model.unet.*``                           ``unet.*`` (diffusers 0.16.1 names; see below)
``mv_base_model.cp_blocks_encoder.{i}.*``          ``caa_down.{i}.*``
``mv_base_model.cp_blocks_mid.*``                  ``caa_mid.*``
``mv_base_model.cp_blocks_decoder.{i}.*``          ``caa_up.{i}.*``
``mv_base_model.condition_conv_in.*``              ``condition.conv_in.*``
``mv_base_model.condition_downblocks.{i}.*``       ``condition.down.{i}.*``
``mv_base_model.condition_downblocks.{last}.*``    ``condition.mid.*`` as well (the released mid
                                                   block reuses the last down encoder, §17.4)
``mv_base_model.condition_upblocks.{i}.*``         ``condition.up.{i}.*``
``vae.*``, ``text_encoder.*``                      not loaded here: :func:`component_state_dict`
=================================================  ===========================================

The condition rows apply to a model built with a condition branch; for one without, the file's
condition tensors are reported as skipped. Inside a condition encoder the names agree
(``norm1, conv1, norm2, conv2``).

Inside each CAA block (:data:`CAA_NAMES`): ``{attn}transformer.norm1/norm2`` ->
``attention.norm1/norm2``; ``{attn}transformer.attn1.to_q/to_k/to_v/to_out`` ->
``attention.to_q/to_k/to_v/to_out``; ``{attn}transformer.ff.net.0.proj`` -> ``attention.ff.proj``;
``{attn}transformer.ff.net.2`` -> ``attention.ff.out``; ``resnet.conv1/conv2`` ->
``resnet.conv1/conv2``; ``resnet.bn1/bn2`` (GroupNorms) -> ``resnet.norm1/norm2``.
``{attn}pe.freq_bands`` is the released encoding's frequency buffer: it is not a weight of ours,
so it is checked against :func:`released_frequencies` and kept in the report for
:func:`use_released_behaviour`.

UNet names: the released code pins diffusers 0.16.1. Its ``UNet2DConditionModel`` parameter names
are the ones diffusers 0.42 uses (the SD 2 hub weights, saved by older diffusers still, load into
0.42 without any UNet rename), so :data:`UNET_RENAMES` is empty. The VAE differs: 0.16's mid-block
attention is ``query/key/value/proj_attn``, 0.42's ``to_q/to_k/to_v/to_out.0`` (:data:`VAE_RENAMES`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..validation import InputError
from .caa import CAABlock
from .loading import MODEL_NAMES, read_checkpoint
from .mv_unet import MultiViewUNet
from .released_encoding import (
    ReleasedDepthEncoding,
    ReleasedPanoramaEncoding,
    released_frequencies,
)

__all__ = [
    "CAA_NAMES",
    "KEY_MAP",
    "LoadReport",
    "ReleasedDepthEncoding",
    "ReleasedPanoramaEncoding",
    "component_state_dict",
    "load_released_checkpoint",
    "released_frequencies",
    "released_key_map",
    "released_name",
    "use_released_behaviour",
]

FIELD = "checkpoint"

KEY_MAP: tuple[tuple[str, str], ...] = (
    ("mv_base_model.unet.", "unet."),
    ("mv_base_model.cp_blocks_encoder.{i}.", "caa_down.{i}."),
    ("mv_base_model.cp_blocks_mid.", "caa_mid."),
    ("mv_base_model.cp_blocks_decoder.{i}.", "caa_up.{i}."),
    ("mv_base_model.condition_conv_in.", "condition.conv_in."),
    ("mv_base_model.condition_downblocks.{i}.", "condition.down.{i}."),
    ("mv_base_model.condition_downblocks.{last}.", "condition.mid."),
    ("mv_base_model.condition_upblocks.{i}.", "condition.up.{i}."),
)
"""(released prefix, our prefix): where each of our tensors comes from, first matching row wins.
One released tensor may feed several of ours (the last down condition encoder feeds ``mid`` too)."""

CAA_NAMES: tuple[tuple[str, str], ...] = (
    ("{attn}transformer.norm1.weight", "attention.norm1.weight"),
    ("{attn}transformer.norm1.bias", "attention.norm1.bias"),
    ("{attn}transformer.attn1.to_q.weight", "attention.to_q.weight"),
    ("{attn}transformer.attn1.to_k.weight", "attention.to_k.weight"),
    ("{attn}transformer.attn1.to_v.weight", "attention.to_v.weight"),
    ("{attn}transformer.attn1.to_out.weight", "attention.to_out.weight"),
    ("{attn}transformer.attn1.to_out.bias", "attention.to_out.bias"),
    ("{attn}transformer.ff.net.0.proj.weight", "attention.ff.proj.weight"),
    ("{attn}transformer.ff.net.0.proj.bias", "attention.ff.proj.bias"),
    ("{attn}transformer.ff.net.2.weight", "attention.ff.out.weight"),
    ("{attn}transformer.ff.net.2.bias", "attention.ff.out.bias"),
    ("{attn}transformer.norm2.weight", "attention.norm2.weight"),
    ("{attn}transformer.norm2.bias", "attention.norm2.bias"),
    ("resnet.conv1.weight", "resnet.conv1.weight"),
    ("resnet.bn1.weight", "resnet.norm1.weight"),
    ("resnet.bn1.bias", "resnet.norm1.bias"),
    ("resnet.conv2.weight", "resnet.conv2.weight"),
    ("resnet.bn2.weight", "resnet.norm2.weight"),
    ("resnet.bn2.bias", "resnet.norm2.bias"),
)
"""(released name under a CAA block, ours under a :class:`CAABlock`). The ResNet rows exist only in
the depth design, as does our ``resnet``."""

FREQUENCIES = "{attn}pe.freq_bands"
CAA_PREFIXES = ("caa_down.", "caa_mid.", "caa_up.")
UNET_PREFIX = "mv_base_model.unet."
ATTENTION_PREFIX = {"panorama": "", "depth": "attn1."}

UNET_RENAMES: tuple[tuple[str, str], ...] = ()
"""(diffusers 0.16.1 UNet name part, 0.42 name part); none known for SD 2 UNets."""

VAE_RENAMES: tuple[tuple[str, str], ...] = (
    ("query", "to_q"),
    ("key", "to_k"),
    ("value", "to_v"),
    ("proj_attn", "to_out.0"),
)
"""Mid-block attention of the VAE: diffusers 0.16.1 names -> 0.42 names (``group_norm`` is unchanged)."""

COMPONENTS = {"vae.": "vae", "text_encoder.": "text_encoder"}
"""Frozen SD 2 parts the released module also saved; never loaded into the UNet."""

_VAE_ATTENTION = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.")
_RELEASED_DESIGN = re.compile(r"^mv_base_model\.cp_blocks_(?:encoder\.\d+|mid|decoder\.\d+)\.(attn1\.|transformer\.)")


# ---------------------------------------------------------------------------------------------------------- key map
def _pattern(ours_prefix: str) -> re.Pattern:
    return re.compile("^" + re.escape(ours_prefix).replace(r"\{i\}", r"(?P<i>\d+)"))


_KEY_PATTERNS = tuple((released, _pattern(ours)) for released, ours in KEY_MAP)
_CAA_BY_OURS = {ours: released for released, ours in CAA_NAMES}


def _released_prefix(key: str, last: int) -> tuple[str, str] | None:
    """(released prefix, rest of ``key``) by the first :data:`KEY_MAP` row whose prefix ``key`` has."""
    for released, pattern in _KEY_PATTERNS:
        match = pattern.match(key)
        if match:
            level = match.groupdict().get("i") or ""
            return released.replace("{i}", level).replace("{last}", str(last)), key[match.end():]
    return None


def released_name(key: str, task: str, levels: int = 4) -> str | None:
    """The released name of the tensor our ``key`` loads from, in a ``task`` model whose UNet has
    ``levels`` down blocks; None if the release has no such tensor."""
    found = _released_prefix(key, levels - 1)
    if found is None:
        return None
    prefix, rest = found
    if key.startswith(CAA_PREFIXES):
        name = _CAA_BY_OURS.get(rest)
        return None if name is None else prefix + name.replace("{attn}", ATTENTION_PREFIX[task])
    if key.startswith("unet."):
        for old, new in UNET_RENAMES:
            rest = rest.replace(new, old)
    return prefix + rest


def released_key_map(model: MultiViewUNet) -> dict[str, str | None]:
    """``{our name: released name}`` for every tensor of ``model``; None where the release has none."""
    levels = len(model.unet.down_blocks)
    return {key: released_name(key, model.task, levels) for key in model.state_dict()}


def _frequency_keys(model: MultiViewUNet) -> dict[str, str]:
    """``{released pe.freq_bands key: our block name}``."""
    frequencies = FREQUENCIES.replace("{attn}", ATTENTION_PREFIX[model.task])
    last = len(model.unet.down_blocks) - 1
    return {_released_prefix(name + ".", last)[0] + frequencies: name for name, _ in caa_blocks(model)}


def caa_blocks(model: MultiViewUNet) -> Iterator[tuple[str, CAABlock]]:
    """``(name, block)`` for the nine CAA blocks, in the order the UNet runs them."""
    for i, block in enumerate(model.caa_down):
        yield f"caa_down.{i}", block
    yield "caa_mid", model.caa_mid
    for i, block in enumerate(model.caa_up):
        yield f"caa_up.{i}", block


# ---------------------------------------------------------------------------------------------------------- report
@dataclass
class LoadReport:
    """What a load did. Our names for model tensors, the file's names for file keys.

    ``skipped`` holds file keys deliberately left out (component -> keys): ``vae``,
    ``text_encoder``, and ``condition`` when the model has no condition branch.
    ``frequencies`` maps our block names to the file's ``pe.freq_bands`` (flattened).
    """

    design: str | None
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    frequency_mismatches: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    frequencies: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def complete(self) -> bool:
        """Every model tensor came from the file and every file key was placed or deliberately skipped."""
        return not (self.missing or self.unexpected or self.shape_mismatches or self.frequency_mismatches)

    def summary(self, examples: int = 5) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"] if self.loaded else []
        for label, items in (
            ("missing from the file", self.missing),
            ("unexpected in the file", self.unexpected),
            ("with another shape", [f"{f} -> {o}: file {tuple(a)}, model {tuple(b)}" for f, o, a, b in
                                    self.shape_mismatches]),
            ("frequency buffers differing from the released formula", self.frequency_mismatches),
        ):
            if items:
                shown = ", ".join(items[:examples]) + (", ..." if len(items) > examples else "")
                parts.append(f"{len(items)} {label} ({shown})")
        for component, keys in self.skipped.items():
            parts.append(f"{len(keys)} {component} tensors skipped")
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------- loading
def load_released_checkpoint(
    model: MultiViewUNet,
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    allow_partial: bool = False,
) -> LoadReport:
    """Load a released MVDiffusion checkpoint's UNet and CAA weights into ``model``.

    Files are read with ``weights_only`` semantics (:func:`~backend.models.loading.read_checkpoint`):
    tensors and plain containers only, never arbitrary pickled objects. Nothing is written to the
    model unless the load is complete (no missing, unexpected or reshaped tensors, frequency
    buffers as released) or ``allow_partial`` is set, in which case what fits is loaded and the
    report says what did not. The VAE and text encoder are reported under ``skipped``; load them
    with :func:`component_state_dict`. Call :func:`use_released_behaviour` to run the weights as
    released.
    """
    state = _released_state(path_or_state_dict)
    design = _file_design(state)
    if design is not None and design != model.task:
        raise InputError(
            FIELD, f"this is a {design}-design MVDiffusion checkpoint, but the model is a {model.task} MultiViewUNet"
        )
    _check_unet_kind(state, model)

    report = LoadReport(design=design)
    targets: dict[str, list[str]] = {}
    for ours, released in released_key_map(model).items():
        if released is not None:
            targets.setdefault(released, []).append(ours)
    frequency_keys = _frequency_keys(model)
    own = model.state_dict()
    has_condition = getattr(model, "condition", None) is not None
    to_copy: list[tuple[str, torch.Tensor]] = []
    for key, tensor in state.items():
        if key in targets:
            for ours in targets[key]:
                if tuple(tensor.shape) != tuple(own[ours].shape):
                    report.shape_mismatches.append((key, ours, tuple(tensor.shape), tuple(own[ours].shape)))
                else:
                    to_copy.append((ours, tensor))
        elif key in frequency_keys:
            _check_frequencies(model, key, frequency_keys[key], tensor, report)
        elif (component := _component(key, has_condition)) is not None:
            report.skipped.setdefault(component, []).append(key)
        else:
            report.unexpected.append(key)
    found = {ours for ours, _ in to_copy} | {ours for _, ours, _, _ in report.shape_mismatches}
    report.missing = [key for key in own if key not in found]

    if not report.complete and not allow_partial:
        hint = ""
        if design is None:
            hint = " The file holds no CAA blocks (a base-UNet checkpoint such as depth_single_view.ckpt?)."
        raise InputError(
            FIELD,
            f"does not fit the {model.task} multi-view UNet: {len(to_copy)} tensors fit; {report.summary()}.{hint} "
            "Nothing was loaded; pass allow_partial=True to load what fits",
        )
    with torch.no_grad():
        for ours, tensor in to_copy:
            own[ours].copy_(tensor)
    report.loaded = [ours for ours, _ in to_copy]
    return report


def _released_state(source) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        state = source
        while isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputError(FIELD, f"{path} does not exist or is not a file")
    try:
        return read_checkpoint(path)
    except InputError as err:  # same problem, reported under this function's argument
        raise InputError(FIELD, err.problem) from None


def _file_design(state: Mapping[str, torch.Tensor]) -> str | None:
    """'depth' (blocks wrap ``attn1.``), 'panorama' (bare ``transformer.``), or None without CAA blocks."""
    designs = {match[1] for key in state if (match := _RELEASED_DESIGN.match(key))}
    if designs == {"attn1."}:
        return "depth"
    if designs == {"transformer."}:
        return "panorama"
    if designs:
        raise InputError(FIELD, "holds CAA blocks of both the panorama and the depth design; it is not a released file")
    return None


def _check_unet_kind(state: Mapping[str, torch.Tensor], model: MultiViewUNet) -> None:
    """A UNet of another kind (base / depth / inpainting) is the wrong model, not a partial load."""
    conv_in = state.get(UNET_PREFIX + "conv_in.weight")
    want = model.unet.config.in_channels
    if conv_in is None or conv_in.dim() != 4 or conv_in.shape[1] == want:
        return
    have = conv_in.shape[1]
    raise InputError(
        FIELD,
        f"its UNet takes {have} input channels ({MODEL_NAMES.get(have, 'no SD 2 model')}), the model's takes {want} "
        f"({MODEL_NAMES.get(want, 'no SD 2 model')}); pano.ckpt needs SD 2 base, pano_outpaint.ckpt SD 2 inpainting, "
        "depth_gen.ckpt SD 2 depth",
    )


def _check_frequencies(model, key: str, block: str, tensor: torch.Tensor, report: LoadReport) -> None:
    attention = model.get_submodule(block).attention
    count = attention.dim // (4 if model.task == "panorama" else 2)
    bands = tensor.detach().to("cpu", torch.float32).reshape(-1)
    expected = released_frequencies(count)
    if bands.shape != expected.shape or not torch.allclose(bands, expected, rtol=1e-6, atol=0.0):
        report.frequency_mismatches.append(key)
    else:
        report.frequencies[block] = bands.clone()


def _component(key: str, has_condition: bool) -> str | None:
    for prefix, component in COMPONENTS.items():
        if key.startswith(prefix):
            return component
    if not has_condition and key.startswith("mv_base_model.condition_"):
        return "condition"
    return None


def component_state_dict(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], component: str, into: nn.Module
) -> dict[str, torch.Tensor]:
    """The released ``vae`` or ``text_encoder`` tensors, renamed for ``into`` (a diffusers VAE or CLIP text model).

    VAE: diffusers 0.16's attention names become 0.42's. Text encoder: transformers 4.28 saved a
    ``position_ids`` buffer that newer versions rebuild, and newer models may drop the
    ``text_model.`` level; both are matched to ``into``. Load the result with ``strict=True``.
    """
    if component not in COMPONENTS.values():
        raise InputError("component", f"must be one of {sorted(COMPONENTS.values())}, got {component!r}")
    prefix = next(p for p, c in COMPONENTS.items() if c == component)
    state = _released_state(path_or_state_dict)
    own = set(into.state_dict())
    out = {}
    for key, tensor in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if component == "vae":
            match = _VAE_ATTENTION.match(name)
            if match:
                new = dict(VAE_RENAMES)[match[2]]
                name = f"{match[1]}.{new}." + name[match.end():]
        else:
            if name.endswith("embeddings.position_ids") and name not in own:
                continue
            if name.startswith("text_model.") and name not in own and name[len("text_model."):] in own:
                name = name[len("text_model."):]
        out[name] = tensor
    return out


# ---------------------------------------------------------------------------------------------------------- behaviour
def use_released_behaviour(model: MultiViewUNet, report: LoadReport | None = None) -> MultiViewUNet:
    """Make the model compute as the released code: invalid keys enter the softmax as zero
    vectors, the positional encodings carry the released quirks, and the condition branch adds
    in place, so the skips stored before down blocks carry it too (:mod:`~backend.models.mv_unet`).

    With a ``report`` from :func:`load_released_checkpoint` the encodings use the file's own
    frequency buffers, bit for bit; without one, the released formula's.

    The key tokens are the caller's: build them with the released rules as well,
    ``depth_geometry(cameras, depths, released_depth_neighbours(cameras, depths), released=True)``
    or ``panorama_geometry(cameras, released_panorama_neighbours(len(cameras)), released=True)``
    (:mod:`~backend.models.caa_geometry`).
    """
    encoding_class = ReleasedPanoramaEncoding if model.task == "panorama" else ReleasedDepthEncoding
    frequencies = report.frequencies if report is not None else {}
    for name, block in caa_blocks(model):
        attention = block.attention
        reference = attention.to_q.weight
        encoding = encoding_class(attention.dim, frequencies.get(name))
        attention.encoding = encoding.to(reference.device)
        attention.mask_invalid = False
    model.released = True
    return model
