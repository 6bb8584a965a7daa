"""Diffusers state dicts renamed to the original Stable Diffusion (LDM) checkpoint layout.

Single-file checkpoints of real models come in this layout; the tests write tiny ones with it.
"""

import re

import torch

RESNET_NAMES = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


def _resnet(rest: str) -> str:
    for new, old in RESNET_NAMES:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def unet_to_ldm(state: dict, layers_per_block: int = 1, attention_up_blocks=(1, 2, 3)) -> dict:
    """The original SD UNet names (input_blocks / middle_block / output_blocks) of a diffusers state dict."""
    per = layers_per_block + 1
    fixed = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text and size embedding
        "add_embedding.linear_2": "label_emb.0.2",
    }
    out = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        if head in fixed:
            name = f"{fixed[head]}.{leaf}"
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            block, index = int(m[2]), int(m[4])
            slot, rest = (0, _resnet(m[5])) if m[3] == "resnets" else (1, m[5])
            number = block * per + index + 1 if m[1] == "down" else block * per + index
            name = f"{'input' if m[1] == 'down' else 'output'}_blocks.{number}.{slot}.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            name = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            block = int(m[1])
            name = f"output_blocks.{block * per + per - 1}.{2 if block in attention_up_blocks else 1}.conv.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            name = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", key):
            name = f"middle_block.1.{m[1]}"
        else:
            raise KeyError(key)
        out["model.diffusion_model." + name] = value
    return out


def vae_to_ldm(state: dict, blocks: int = 4) -> dict:
    """The original SD VAE names; decoder levels count the other way and attention weights are 1x1 convs."""
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        name = re.sub(
            r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
            lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.",
            name,
        )
        name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", name):
            name = f"{m[1]}.mid.attn_1.{attention[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = value[:, :, None, None]
        out["first_stage_model." + name] = value
    return out


def open_clip_to_ldm(state: dict) -> dict:
    """OpenCLIP names as in SD 2 checkpoints: fused q/k/v projection, resblocks, ln_final."""
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    prefix = "cond_stage_model.model."
    hidden = state["final_layer_norm.weight"].shape[0]
    out = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
        prefix + "text_projection": torch.eye(hidden),
    }
    layers = {int(key.split(".")[2]) for key in state if key.startswith("encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for ldm, ours in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                out[f"{dst}{ldm}.{leaf}"] = state[f"{src}{ours}.{leaf}"]
    return out


def controlnet_to_ldm(state: dict) -> dict:
    """A diffusers ControlNet in the original layout: the UNet encoder's names under control_model., the
    zero convolutions and the depth-image encoder (input_hint_block: 0 in, 2, 4, ... 12 blocks, 14 out)."""
    shared = {key: value for key, value in state.items() if not key.startswith("controlnet_")}
    out = {key.replace("model.diffusion_model.", "control_model."): value for key, value in unet_to_ldm(shared).items()}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        if head.startswith("controlnet_down_blocks."):
            out[f"control_model.zero_convs.{head.split('.')[1]}.0.{leaf}"] = value
        elif head == "controlnet_mid_block":
            out[f"control_model.middle_block_out.0.{leaf}"] = value
        elif head == "controlnet_cond_embedding.conv_in":
            out[f"control_model.input_hint_block.0.{leaf}"] = value
        elif head.startswith("controlnet_cond_embedding.blocks."):
            out[f"control_model.input_hint_block.{2 * (int(head.split('.')[-1]) + 1)}.{leaf}"] = value
        elif head == "controlnet_cond_embedding.conv_out":
            out[f"control_model.input_hint_block.14.{leaf}"] = value
    return {key: value.contiguous() for key, value in out.items()}
