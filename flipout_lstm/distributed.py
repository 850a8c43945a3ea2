"""Data-parallel training across the processes ``torchrun`` starts (DistributedDataParallel).

``torchrun --nproc_per_node=W train.py RECIPE`` starts W copies of the one training loop;
each reads its rank ``r`` from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
What is split and what is shared:

* **Batches.** Every rank builds the same global batch schedule (a function of the seed
  only) and takes its own ``B/W`` columns of each ``(T, B)`` batch: rank ``r`` holds columns
  ``[r B/W, (r+1) B/W)`` (contiguous streams, or whole shuffled sequences). ``B`` must divide
  evenly, so every rank's batch has the same size.
* **Loss and gradient.** Rank ``r`` minimizes the mean over its own tokens, ``ℓ_r``. DDP
  averages the gradients, ``(1/W) Σ_r ∇ℓ_r``; with equal shares that is the gradient of the
  global batch's mean, ``∇ (1/(T B)) Σ_all nll`` — the gradient one process would compute —
  so clipping (after the average) acts on the global gradient. The logged loss is the mean
  of the ranks' ``ℓ_r``, again the global mean.
* **Noise.** After the model is built (identical on every rank; DDP also broadcasts rank 0's
  weights), each rank reseeds its global Python/NumPy/torch generators with
  :func:`noise_seed` ``(seed, rank)``, so dropout masks and weight perturbations (the base
  ``ΔŴ`` of flipout included) are independent across ranks: W independent base
  perturbations per global batch, which lowers the gradient variance (the paper's appendix).
* **Hidden state.** Each rank carries the state of its own columns. A checkpoint holds the
  global ``(B, H)`` state, gathered in rank order, so it is the same file as a one-process
  run's; resuming slices each rank's columns back out.
* **Stopping.** A signal reaches each rank at its own moment; :class:`AgreedStop` exchanges
  the flags once per step (with the loss), so every rank stops after the same step.
* **Validation.** Each rank scores its share of the evaluation columns; the sums of nats and
  token counts are added over ranks (``all_reduce``), giving exactly the one-process figure.
* **Files.** Rank 0 alone writes checkpoints, logs, TensorBoard, ``config.yaml`` and the
  vocabulary, and prints. Every rank reads the checkpoint on ``--resume``, so the run
  directory must be on a filesystem every node sees (as the data must be).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from flipout_lstm.errors import ConfigError
from flipout_lstm.seeds import derived_seed


@dataclass(frozen=True)
class Context:
    """This process's place among ``world`` processes (``world == 1``: no DDP)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that writes files and prints."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` columns: ``[⌊r n/W⌋, ⌊(r+1) n/W⌋)``.

        Equal shares when ``W`` divides ``n``; otherwise they differ by at most one (and may be
        empty), which evaluation allows since it adds sums, not means.
        """
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)


def from_env(environ=None) -> Context:
    """The context torchrun describes in the environment; a plain ``python`` run is rank 0 of 1."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return Context()
    try:
        world = int(env["WORLD_SIZE"])
        rank, local_rank = int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch with torchrun "
                          "or unset them") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={world}); launch with torchrun "
                          f"or unset them")
    return Context(rank=rank, world=world, local_rank=local_rank, local_world=local_world)


def check_batch(ctx: Context, batch_size: int) -> None:
    """``data.batch_size`` is the global batch: it must split evenly across the ranks."""
    if batch_size % ctx.world:
        raise ConfigError(f"data.batch_size={batch_size} is the global batch and must split evenly "
                          f"across {ctx.world} processes; set it to a multiple of {ctx.world} or "
                          f"change --nproc_per_node/--nnodes")


def init(ctx: Context, device: torch.device) -> torch.device:
    """Join the process group: NCCL on CUDA (one GPU per local rank), gloo on the CPU.

    Returns the device this rank trains on: ``cuda:LOCAL_RANK`` for CUDA, else the CPU.
    """
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if ctx.local_rank >= count:
            raise ConfigError(f"LOCAL_RANK={ctx.local_rank} but this node has {count} CUDA "
                              f"device(s); start at most {count} processes per node "
                              f"(--nproc_per_node) or set train.device=cpu")
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=30),
                            **({"device_id": device} if backend == "nccl" else {}))
    return device


def shutdown(together: bool) -> None:
    """Leave the process group, if this process joined one.

    ``together``: the run ended normally, so every rank gets here; they meet at a barrier
    first and no rank closes its gloo connections while a peer is still finishing the run's
    last collective (one CI run lost a finished rank that way, aborted in a worker thread
    with "terminate called without an active exception"). After an error a rank leaves at
    once: its peers may never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def noise_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank ``rank``'s noise and dropout stream: SHA-256 of ``"seed:noise:rank:step"``.

    A hash rather than ``seed + rank`` so that rank 0's stream is not the one that drew the
    initial weights, and neighbouring seeds do not share streams across ranks. ``step`` is
    nonzero only when a checkpoint is resumed by another number of processes than wrote it
    (its per-rank generator states do not fit), so the streams do not start over from step 0's.
    """
    return derived_seed(int(seed), "noise", int(rank), int(step))


def launcher(ctx: Context) -> str:
    """How this process was started, for the "resume with" hint."""
    if not ctx.enabled:
        return "python"
    nodes = ctx.world // ctx.local_world
    if nodes == 1:
        return f"torchrun --nproc_per_node={ctx.local_world}"
    return f"torchrun --nnodes={nodes} --nproc_per_node={ctx.local_world} <your rendezvous flags>"


def barrier() -> None:
    dist.barrier()


@contextlib.contextmanager
def local_zero_first(ctx: Context):
    """Run the block on each node's local rank 0 first, then on the node's other ranks.

    For work that fills a cache on disk (a download, a tokenizer, an encoded corpus): the
    first process writes it, the others find it. A no-op without DDP.
    """
    if ctx.enabled and ctx.local_rank != 0:
        dist.barrier()
    yield
    if ctx.enabled and ctx.local_rank == 0:
        dist.barrier()


def _device() -> torch.device:
    """Where collectives run: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(*values: float) -> list[float]:
    """Each value added over all ranks (float64), e.g. nats and token counts of a split."""
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (picklable data, e.g. RNG states)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_columns(state):
    """The carried ``[(h, c), ...]`` of every rank joined along the batch into the global state.

    Rank ``r`` holds columns ``[r B/W, (r+1) B/W)``, so concatenating in rank order restores
    the one-process layout. ``None`` (no state carried) stays ``None`` (the ranks agree on it).
    """
    if state is None:
        return None
    world, out = dist.get_world_size(), []
    for pair in state:
        joined = []
        for t in pair:
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            joined.append(torch.cat(parts, dim=0))
        out.append(tuple(joined))
    return out


class AgreedStop:
    """A stop request every rank sees at the same step.

    Wraps the process's own signal flag (``local.signum``, set by its handler at any moment).
    ``signum`` here changes only in :meth:`agree`, which every rank calls once per step: it
    exchanges ``(loss, signal)`` and sets ``signum`` to the largest signal number any rank
    received, so all ranks break out of the loop after the same step and checkpoint once.
    """

    def __init__(self, local):
        self.local = local
        self.signum = None

    def agree(self, loss: float) -> float:
        """The mean of the ranks' losses (the global batch's mean loss); updates ``signum``."""
        mine = torch.tensor([loss, float(self.local.signum or 0)], dtype=torch.float64,
                            device=_device())
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        table = torch.stack(parts).cpu()
        signum = int(table[:, 1].max())
        if signum:
            self.signum = signum
        # The same sum in the same order on every rank: bitwise-identical on all of them.
        return float(table[:, 0].sum() / len(parts))
