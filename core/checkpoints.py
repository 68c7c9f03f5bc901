"""Checkpoints: what a run needs to continue exactly where it stopped.

    checkpoints/step-000006/
        adapter_state.safetensors   the adapter's trainable tensors
        adapter/                    the same adapter exported as PEFT saves it (what is served)
        trainer_state.pt            optimizer, learning-rate schedule, torch (and CUDA) RNG
        state.json                  the step, and what the run was doing at it

A checkpoint is written in a hidden staging directory and renamed into place, so a crash never
leaves half of one; only the newest `keep` are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from core.adapters import export_adapter, load_trainable_state, trainable_state

BEST_ADAPTER = "best_adapter_state.safetensors"


def save_checkpoint(
    root: Path,
    step: int,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    keep: int,
    replaced_start: tuple[int, ...] = (),
    best_adapter: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint of `step` under `root`; `state` (JSON) is returned by load_checkpoint.

    `replaced_start`: the prompt tokens the adapter stands in for (`core.adapters.export_adapter`);
    `best_adapter`: early stopping's best adapter so far (returned as the state's `best_adapter`).
    """
    final = root / f"step-{step:06d}"
    staging = root / f".step-{step:06d}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in trainable_state(model).items()}, staging / "adapter_state.safetensors"
    )
    if best_adapter is not None:
        save_file({k: v.contiguous() for k, v in best_adapter.items()}, staging / BEST_ADAPTER)
    # A checkpoint answers chat too.
    export_adapter(model, staging / "adapter", state.get("model", ""), replaced_start)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        staging / "trainer_state.pt",
    )
    (staging / "state.json").write_text(json.dumps({"step": step, **state}))
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> dict[str, Any]:
    """Restore a checkpoint directory, or the newest one under an output directory; its state."""
    path = _checkpoint_dir(path)
    state_file = path / "state.json"
    load_trainable_state(model, load_file(path / "adapter_state.safetensors", device=str(device)))
    trainer_state = torch.load(path / "trainer_state.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    torch.set_rng_state(trainer_state["torch_rng"].cpu())
    if trainer_state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer_state["cuda_rng"])
    best = path / BEST_ADAPTER
    best_adapter = load_file(best) if best.is_file() else None  # on the CPU, as the trainer keeps it
    return {**json.loads(state_file.read_text()), "path": str(path), "best_adapter": best_adapter}


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory (or the newest one under an output directory) was saved at."""
    return int(json.loads((_checkpoint_dir(path) / "state.json").read_text())["step"])


def _checkpoint_dir(path: Path) -> Path:
    """`path` itself if it is a checkpoint, else the newest checkpoint under it."""
    path = latest_checkpoint(path) or Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def latest_checkpoint(path: Path) -> Path | None:
    candidates = sorted(
        p for p in (Path(path) / "checkpoints").glob("step-*") if (p / "state.json").is_file()
    )
    return candidates[-1] if candidates else None
