"""One training run over several processes (data parallel), launched by `torchrun` or `accelerate launch`.

Both launchers start one process per GPU (or per share of a CPU) and tell each its place in the
environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. `Ranks.from_environment`
reads it; without WORLD_SIZE (or with 1) a run is one process and nothing here costs anything.

How a step is split, so that N processes compute what one would at the same global batch:
- every rank knows the whole step's examples (their order is a pure function of the step) and
  takes a contiguous shard of them (`shard`): a group of rollouts stays on one rank;
- what the rollouts are and how they were rewarded is gathered to every rank (`gather`), so
  advantages, metrics, reward-error checks and the entropy threshold of the demonstration prefix
  are computed on the whole step, identically everywhere;
- each rank's loss is divided by the whole step's normaliser, so the sum of the ranks' gradients
  (`sum_gradients`) is the one-process gradient; the gradient-norm clip and AdamW then run on the
  same numbers on every rank, and the adapters stay equal without being sent;
- rank 0 reports, checkpoints and exports; the others run no callbacks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from core.rewards import RewardResult

T = TypeVar("T")


def shard(count: int, rank: int, world_size: int) -> range:
    """The contiguous share of `count` items that `rank` of `world_size` takes (sizes differ by at most 1)."""
    return range(rank * count // world_size, (rank + 1) * count // world_size)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run: rank `rank` of `world_size` (one process: 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The rank that reports, checkpoints and exports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device: str = "auto", timeout_minutes: float = 30.0) -> Ranks:
        """Join the process group that torchrun / accelerate launch describe in the environment.

        `device` is the run's (training.device): on CUDA each process takes the GPU of its
        LOCAL_RANK and the ranks talk over nccl; on CPU over gloo (also on CUDA with
        PREFIX_RFT_DISTRIBUTED_BACKEND=gloo). Without WORLD_SIZE, or with 1, this is one process
        and no group is made.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_initialized():
            cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = os.environ.get("PREFIX_RFT_DISTRIBUTED_BACKEND") or ("nccl" if cuda else "gloo")
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        return cls(dist.get_rank(), dist.get_world_size())

    def shard(self, count: int) -> range:
        return shard(count, self.rank, self.world_size)

    def gather(self, value: T) -> list[T]:
        """Every rank's `value` (picklable, CPU tensors only), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def from_main(self, value: T) -> T:
        """Rank 0's `value`, on every rank (a decision only rank 0 can make: stop the run, ...)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each number summed over the ranks, in float64."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its sum over the ranks (a missing one counts as zero).

        Each rank's loss was divided by the whole step's normaliser, so the sum is the gradient
        one process gets from the whole batch. A parameter that no rank has a gradient for keeps
        none, so the optimizer skips it as it would in one process. The adapters are small: one
        flat all-reduce, with a has-gradient flag per parameter at its end.
        """
        if not self.distributed:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has_grad = torch.tensor([float(p.grad is not None) for p in params], device=self._device())
        flat = torch.cat([*(g.reshape(-1).float() for g in grads), has_grad])
        dist.all_reduce(flat)
        offset = 0
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            n = g.numel()
            summed = flat[-len(params) + i] > 0
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype) if summed else None
            offset += n

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block, then the others do: what it makes once (a base model converted
        into the data directory) the others find made."""
        if not self.distributed:
            yield
            return
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    def broadcast_parameters(self, params: Sequence[torch.Tensor]) -> None:
        """Rank 0's values of `params` on every rank: all ranks start from the same adapter."""
        if not self.distributed:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def concat_reward_results(parts: Sequence[RewardResult]) -> RewardResult:
    """The reward of rows scored in parts (by rank, in row order), as if scored at once.

    Lists are concatenated; error counts and scoring times summed; `correct` is kept when every
    part has it (a binary spec), and a part without rows counts for nothing.
    """
    parts = [p for p in parts if p.totals] or list(parts[:1])
    labels = list(dict.fromkeys(label for p in parts for label in p.per_grader))
    correct = None
    if parts and all(p.correct is not None for p in parts):
        correct = [c for p in parts for c in p.correct or []]

    def joined(field: str, label: str) -> list[Any]:
        return [v for p in parts for v in getattr(p, field).get(label, [None] * len(p.totals))]

    failures_labels = list(dict.fromkeys(label for p in parts for label in p.failures))
    output_labels = list(dict.fromkeys(label for p in parts for label in p.outputs))
    return RewardResult(
        totals=[t for p in parts for t in p.totals],
        per_grader={label: joined("per_grader", label) for label in labels},
        errors={
            label: sum(p.errors.get(label, 0) for p in parts)
            for label in dict.fromkeys(label for p in parts for label in p.errors)
        },
        failures={label: joined("failures", label) for label in failures_labels},
        outputs={label: [o for p in parts for o in p.outputs.get(label, [])] for label in output_labels},
        seconds={
            label: sum(p.seconds.get(label, 0.0) for p in parts)
            for label in dict.fromkeys(label for p in parts for label in p.seconds)
        },
        correct=correct,
    )
