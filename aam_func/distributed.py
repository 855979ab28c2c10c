"""Data-parallel training on ``torch.distributed``, launched by ``torchrun``.

    ctx = distributed.init_from_env("cpu", timeout=300)      # None outside torchrun (or WORLD_SIZE=1)
    params = ctx.broadcast_tree(params)                       # every rank starts from rank 0's params
    step = make_train_step(loss_fn, opt, grad_reduce=ctx.grad_reduce)
    loader = BlockLoader(blocks, global_batch, seed=0, rank=ctx.rank, world_size=ctx.world_size)
    params, opt_state, metrics = step(params, opt_state, loader.batch(i))   # metrics are global

Every rank holds all params and the whole optimizer state (plain data parallelism, like DDP).
Each rank reads a disjoint shard of the global batch, takes the gradient of its local mean
loss, and :meth:`DistContext.grad_reduce` turns the local results into the global ones:

    g = Σ_r n_r · g_r / Σ_r n_r          loss = Σ_r n_r · loss_r / Σ_r n_r

where ``n_r`` is the number of predicted tokens on rank ``r`` (targets other than -100). Since
each ``loss_r`` is a mean over its ``n_r`` tokens, this is exactly the mean over all tokens of
the global batch, i.e. what one process computes on the whole batch, whatever the padding. The
sums are bucketed ``all_reduce``s (flat buffers of at most ``bucket_bytes``, issued together,
then waited on). The optimizer then sees the same gradients on every rank, so params stay equal
without further communication.

Failure: ``init_process_group`` gets a ``timeout``, so a rank that dies or stops answering makes
the others' collectives fail (at once when its sockets close, else after the timeout) and every
collective here turns that into a :class:`DistributedError` naming the rank and the operation.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import tree
from .train import weighted_mean_loss

__all__ = ["DistributedError", "DistContext", "World", "env_world", "init_from_env", "all_reduce_sum", "BUCKET_BYTES"]

BUCKET_BYTES = 25 * 2**20
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective failed: another process died, or did not answer within the timeout."""


class World(NamedTuple):
    """This process's place in a torchrun job: its rank, the number of processes, its rank on this machine."""

    rank: int
    world_size: int
    local_rank: int


def env_world() -> World:
    """The :class:`World` of torchrun's environment; ``World(0, 1, 0)`` without it.
    Reads the environment only (no process group is created)."""
    if "WORLD_SIZE" not in os.environ:
        return World(0, 1, 0)
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DistributedError("RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                               + ", ".join(f"{k}={os.environ.get(k)!r}" for k in _ENV[:3])) from None
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return World(rank=rank, world_size=world, local_rank=local)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


@dataclass
class DistContext:
    """One process of a data-parallel job: its rank, the world size and the device it uses."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout_s: float
    bucket_bytes: int = BUCKET_BYTES
    stopping: bool = False  # set by a SIGTERM/SIGINT handler: a failing collective then means "stop", not "error"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def _collective(self, what: str):
        try:
            yield
        except DistributedError:
            raise
        except (RuntimeError, dist.DistError) as e:
            if self.stopping:
                raise KeyboardInterrupt from e
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed; another process died or did not answer "
                f"within --dist-timeout {self.timeout_s:g}s ({_first_line(e)})"
            ) from e

    # -------------------------------------------------------------- collectives

    def barrier(self, what: str = "barrier") -> None:
        with self._collective(what):
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def broadcast_object(self, obj: Any = None, what: str = "broadcast from rank 0") -> Any:
        """Rank 0's ``obj`` on every rank (pickled; for small things: arguments, configs, token ids)."""
        box = [obj if self.is_main else None]
        with self._collective(what):
            dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def broadcast_tree(self, params: Mapping, what: str = "broadcast of params from rank 0") -> dict:
        """A copy of rank 0's tree on every rank. Every rank must pass a tree of the same names,
        shapes and dtypes (its values are ignored except on rank 0)."""
        flat = tree.flatten(params)
        tensors = [v.detach().to(self.device).clone() for v in flat.values()]
        with self._collective(what):
            for group in _buckets(tensors, self.bucket_bytes):
                buf = _pack(group)
                dist.broadcast(buf, src=0)
                _unpack_into(buf, group)
        out = dict(zip(flat, (t.to(v.device) for t, v in zip(tensors, flat.values()))))
        return tree.unflatten_like(params, out)

    def all_sum(self, tensors: list[Tensor], what: str = "all_reduce") -> list[Tensor]:
        """Element-wise sums over the ranks of each tensor (bucketed)."""
        with self._collective(what):
            return all_reduce_sum(tensors, self.bucket_bytes)

    def grad_reduce(self, local: Mapping[str, Any]) -> dict:
        """The hook for :func:`aam_func.train.make_train_step`: ``{"grads", "loss", "weight", "tokens"}``
        of this rank (grads and loss are means over ``weight`` predicted tokens) -> the same keys
        for the global batch: token-weighted mean grads and loss, summed weight and tokens."""
        grads, weight = local["grads"], local["weight"]
        flat = tree.flatten(grads)
        # each part moved to the process's device first: a count built on the CPU must not meet
        # CUDA gradients in one stack
        w = weight.to(device=self.device, dtype=torch.float64)
        stats = torch.stack([local["loss"].detach().to(device=self.device, dtype=torch.float64) * w, w,
                             local["tokens"].to(device=self.device, dtype=torch.float64)])
        leaves = [g * w.to(g.dtype) for g in flat.values()] + [stats]
        summed = self.all_sum(leaves, what="all_reduce of gradients")
        loss_sum, total, tokens = summed[-1].unbind()
        total = total.clamp(min=1.0)
        reduced = {k: s / total.to(s.dtype) for k, s in zip(flat, summed[:-1])}
        return {"grads": tree.unflatten_like(grads, reduced), "loss": (loss_sum / total).to(local["loss"].dtype),
                "weight": total.to(torch.int64), "tokens": tokens.to(torch.int64)}

    def evaluate(self, eval_step: Callable, params, batches) -> dict[str, float]:
        """:func:`aam_func.train.evaluate` over all ranks: rank ``r`` evaluates batches
        ``r, r + W, r + 2W, ...`` of ``batches``; token-weighted sums are all-reduced."""
        total = torch.zeros(2, dtype=torch.float64)
        for i, batch in enumerate(batches):
            if i % self.world_size != self.rank:
                continue
            m = eval_step(params, batch)
            n = float(m["tokens"])
            total += torch.tensor([float(m["loss"]) * n, n], dtype=torch.float64)
        (total,) = self.all_sum([total.to(self.device)], what="all_reduce of evaluation")
        loss_sum, count = (float(x) for x in total.cpu())
        return weighted_mean_loss(loss_sum, count)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(device: str | torch.device = "cpu", *, timeout: float = 300.0, backend: Optional[str] = None,
                  bucket_bytes: int = BUCKET_BYTES) -> Optional[DistContext]:
    """Join the job torchrun described in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); ``None`` when there is none or it has one
    process. Backend: nccl for CUDA (each process on ``cuda:LOCAL_RANK``), gloo for CPU."""
    env = env_world()
    rank, world, local = env.rank, env.world_size, env.local_rank
    if world == 1:
        return None
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set; launch with torchrun")
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout),
                                **({"device_id": device} if backend == "nccl" else {}))
    except (RuntimeError, dist.DistError, ValueError) as e:
        raise DistributedError(f"rank {rank} of {world}: could not join the process group at "
                               f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({_first_line(e)})") from e
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device, backend=backend,
                       timeout_s=float(timeout), bucket_bytes=bucket_bytes)


# ----------------------------------------------------------------------------- buckets


def _buckets(tensors: list[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
    """Consecutive runs of same-dtype, same-device tensors of at most ``bucket_bytes`` each (a
    larger tensor is a bucket of its own)."""
    out: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = out[-1] if out else None
        if last is None or last[0].dtype != t.dtype or last[0].device != t.device or size + nbytes > bucket_bytes:
            out.append([t])
            size = nbytes
        else:
            last.append(t)
            size += nbytes
    return out


def _pack(group: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in group]) if len(group) > 1 else group[0].reshape(-1).clone()


def _unpack_into(buf: Tensor, group: list[Tensor]) -> None:
    offset = 0
    for t in group:
        n = t.numel()
        t.copy_(buf[offset:offset + n].view_as(t))
        offset += n


def all_reduce_sum(tensors: list[Tensor], bucket_bytes: int = BUCKET_BYTES) -> list[Tensor]:
    """New tensors holding the sums over all ranks of ``tensors``: packed into flat buckets,
    all-reduced asynchronously (all buckets in flight at once), then unpacked."""
    groups = _buckets(list(tensors), bucket_bytes)
    bufs = [_pack(g) for g in groups]
    works = [dist.all_reduce(b, op=dist.ReduceOp.SUM, async_op=True) for b in bufs]
    out: list[Tensor] = []
    for work, buf, group in zip(works, bufs, groups):
        work.wait()
        offset = 0
        for t in group:
            out.append(buf[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return out
