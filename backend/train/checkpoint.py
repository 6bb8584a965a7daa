"""A run folder's state and checkpoints: what resuming needs, written so a crash never leaves half a file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..validation import InputError
from .config import STAGES

STATE_VERSION = 1


@dataclass
class TrainState:
    stage: str = STAGES[0]
    step: int = 0
    completed: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    scaling_factor: float | None = None
    metrics: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"version": STATE_VERSION, **self.__dict__}, indent=2) + "\n"

    @classmethod
    def read(cls, path: Path) -> TrainState:
        data = json.loads(path.read_text())
        if data.pop("version", None) != STATE_VERSION:
            raise InputError("run", f"{path} was written by another version of the trainer")
        return cls(**data)


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as safetensors tensors plus JSON (param groups, non-tensor values)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
