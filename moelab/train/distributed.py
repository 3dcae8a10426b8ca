"""Multi-process data parallelism: torchrun's environment -> one process group, rank and device.

`torchrun --nproc-per-node N -m moelab train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; a plain
`moelab train` has none of them and runs as a world of one with no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs, shows progress and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when a GPU is present, else cpu; 'cuda' -> cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or "
                         "cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for a GPU but torch sees none; use --device cpu")
    if device.type == "cuda" and device.index is not None and (
            device.index >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s), "
                         f"numbered from 0; use --device cuda:0 .. cuda:"
                         f"{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: this torch has no MPS (Apple GPU) support; use "
                         "--device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: moelab runs on cpu, cuda or mps, not {device.type}")
    return device


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group (nccl on GPUs, gloo on CPU) when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def teardown_distributed(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks in place (a no-op for a world of one); returns the tensor."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


PER_EXPERT = {"per_expert": True}  # NamedSums field metadata: a (K,) field, not a scalar


class NamedSums:
    """Sums that are logged and all-reduced by name, laid out as one float64 tensor.

    A subclass is a dataclass whose fields are float64 tensors on one device: scalars, or (K,)
    where the field's metadata is PER_EXPERT. `tensor` is every field in declaration order,
    flat, so that one all-reduce sums them all; `from_tensor` names a flat tensor's parts again.
    """

    @property
    def tensor(self) -> torch.Tensor:
        """The fields, in declaration order, as one flat float64 tensor (a copy)."""
        return torch.cat([getattr(self, f.name).reshape(-1) for f in fields(self)])

    @classmethod
    def size(cls, num_experts: int = 0) -> int:
        """The length of `tensor` with K = num_experts."""
        return sum(num_experts if f.metadata.get("per_expert") else 1 for f in fields(cls))

    @classmethod
    def from_tensor(cls, flat: torch.Tensor):
        """The fields as views of `flat` (its length says K), laid out as `tensor` lays them."""
        per_expert = sum(bool(f.metadata.get("per_expert")) for f in fields(cls))
        scalars = len(fields(cls)) - per_expert
        K = (len(flat) - scalars) // per_expert if per_expert else 0
        if K < 0 or len(flat) != cls.size(K):
            raise ValueError(f"{cls.__name__} is {scalars} scalars and {per_expert} (K,) "
                             f"fields, which no K lays out in {len(flat)} numbers")
        parts, i = {}, 0
        for f in fields(cls):
            n = K if f.metadata.get("per_expert") else 1
            parts[f.name] = flat[i : i + n] if f.metadata.get("per_expert") else flat[i]
            i += n
        return cls(**parts)

    @classmethod
    def zeros(cls, num_experts: int = 0, device: torch.device | None = None):
        return cls.from_tensor(torch.zeros(cls.size(num_experts), dtype=torch.float64,
                                           device=device))


def all_reduce_max(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Maximum over ranks in place (a no-op for a world of one); returns the tensor."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order (pickled; for small things like RNG states)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
