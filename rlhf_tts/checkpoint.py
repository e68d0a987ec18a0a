"""Atomic, versioned checkpoints: safetensors for every tensor, JSON for everything else.

A checkpoint is a folder `step-<N>/` holding `tensors.safetensors` (model, optimizer moments, RNG
states) and `state.json` (step, data position, optimizer hyper-parameters, config, format version).
It is written under a temporary name, fsynced and renamed; `latest` is replaced atomically after,
so a crash at any point leaves the previous checkpoint intact and never a half-written one. Nothing
is unpickled on load: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_FORMAT = 1


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and a JSON skeleton."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, per_param in state["state"].items():
        entry = {}
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                key = f"optimizer/{index}/{name}"
                tensors[key] = value.detach().cpu().contiguous()
                entry[name] = {"tensor": key}
            else:
                entry[name] = value
        skeleton["state"][str(index)] = entry
    return tensors, skeleton


def _unflatten_optimizer(skeleton: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state = {}
    for index, entry in skeleton["state"].items():
        state[int(index)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in entry.items()}
    return {"state": state, "param_groups": skeleton["param_groups"]}


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write `data` as JSON so that a reader sees the old file or the whole new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def save_checkpoint(
    directory: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
    rng: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 3,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"rng/{k}": v.cpu().contiguous() for k, v in rng.items()})
    meta = dict(state, step=step, format=CHECKPOINT_FORMAT)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    for name in ("tensors.safetensors", "state.json"):
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    pointer = directory / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, directory / "latest")
    _fsync_dir(directory)
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    pointer = Path(directory) / "latest"
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')} is not {CHECKPOINT_FORMAT}")
    tensors = load_file(str(path / "tensors.safetensors"))
    return Checkpoint(step=int(state["step"]), tensors=tensors, state=state, path=path)


def restore(checkpoint: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """Load model (and optimizer) state in place; returns the saved RNG states."""
    model.load_state_dict({k.removeprefix("model/"): v for k, v in checkpoint.tensors.items() if k.startswith("model/")})
    if optimizer is not None and "optimizer" in checkpoint.state:
        optimizer.load_state_dict(_unflatten_optimizer(checkpoint.state["optimizer"], checkpoint.tensors))
    return {k.removeprefix("rng/"): v for k, v in checkpoint.tensors.items() if k.startswith("rng/")}


def load_model_weights(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Weights only (for inference); returns the checkpoint's JSON state."""
    checkpoint = load_checkpoint(path)
    restore(checkpoint, model)
    return checkpoint.state
