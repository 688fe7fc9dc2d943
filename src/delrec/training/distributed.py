"""Data-parallel training on torch.distributed: K processes that compute what one process computes.

``torchrun --nproc-per-node K -m delrec train …`` starts K copies of ``delrec train``. Each one
reads its place in the run from the variables torchrun sets (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); :func:`process_group` joins them, and the
:class:`DataParallel` it yields gives :class:`~delrec.training.loop.Trainer` its hooks:

- ``batch_size`` is the global batch. Every batch of the single-process loader (same seeded
  shuffling, same generator draws) is cut into K contiguous shards, one per rank
  (:class:`ShardedBatches`). Shards differ by at most one item; each rank's loss is weighted
  by ``K · n_rank / n_batch``, so the gradient that DistributedDataParallel averages is the
  gradient of the mean loss over the whole batch. A rank whose shard of a short last batch is
  empty runs the batch's last item as a stand-in with weight 0.
- Each shard is padded in time to the longest item of the whole batch (variable-length data).
- BatchNorm statistics are those of the whole batch (:class:`GlobalBatchNorm`).
- Dropout masks are those of the whole batch, drawn from the shared, identically seeded torch
  RNG: a feedforward mask is a function of its key and of each element's batch row
  (:mod:`delrec.engine.dropout`), so each rank draws the rows of its shard
  (``Dropout.batch_offset``); a recurrent mask is drawn for the whole batch and each rank keeps
  its own rows (a forward pre-hook). The masks are those one process would draw.
- Metrics are sums and counts all-reduced over ranks. After every epoch the ranks compare
  checksums of their parameters and buffers.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Sampler

from delrec.config import ConfigError, resolve_device
from delrec.layers import DelRec
from delrec.layers.dropout import Dropout
from delrec.runs import RunDir
from delrec.training.loop import TrainingError

DEFAULT_TIMEOUT_S = 600.0
MAX_TIMEOUT_S = 30 * 86400.0  # 30 days: more than any wait needs (a huge one overflows timedelta)
MAX_WORLD_SIZE = 2**31 - 1  # torch.distributed counts processes in a C int


class Stopped(KeyboardInterrupt):
    """The launcher stopped this process (SIGTERM), usually because another rank failed."""


def _whole_number(value: str | None) -> int | None:
    """``value`` (an environment variable's) as a whole number, or None if it is not one."""
    return int(value) if value and value.isascii() and value.isdigit() else None


def world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    world = _whole_number(value)
    if world is None or not 1 <= world <= MAX_WORLD_SIZE:
        raise ConfigError(
            f"WORLD_SIZE={value!r} is not a process count (1…{MAX_WORLD_SIZE}); launch with "
            "torchrun"
        )
    return world


def _rank(name: str, world: int, default: str | None = None) -> int:
    """This process's ``RANK`` or ``LOCAL_RANK`` (``default`` when unset), a whole number below
    ``world``."""
    value = os.environ.get(name, default)
    if value is None:
        raise ConfigError(f"WORLD_SIZE={world} is set but {name} is not; launch with torchrun")
    rank = _whole_number(value)
    if rank is None or rank >= world:
        raise ConfigError(
            f"{name}={value!r} is not a rank of the WORLD_SIZE={world} processes "
            f"(0…{world - 1}); launch with torchrun, which sets both"
        )
    return rank


def check_timeout(timeout_s: float) -> None:
    """Refuse a ``--dist-timeout`` that is not a usable wait (NaN, infinite, not > 0, or
    longer than :data:`MAX_TIMEOUT_S`)."""
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ConfigError(
            f"--dist-timeout must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:.0f} "
            f"(30 days), got {timeout_s}"
        )


def _check_port() -> None:
    """Refuse a ``MASTER_PORT`` that is set but not a port number (unset: torch says so)."""
    port = os.environ.get("MASTER_PORT", "")
    if port and not 1 <= (_whole_number(port) or 0) <= 65535:
        raise ConfigError(
            f"MASTER_PORT={port!r} is not a port number (1…65535); launch with torchrun, or "
            "set MASTER_PORT to a free port on the master (rank 0) for every process"
        )


def rank_label() -> str:
    """``"[rank R] "`` in a run of several processes, else ``""`` (a prefix for messages)."""
    several = os.environ.get("WORLD_SIZE", "1") not in ("", "1")
    return f"[rank {os.environ.get('RANK', '?')}] " if several else ""


# --------------------------------------------------------------------------- sharding
@dataclass(frozen=True)
class Shard:
    """Rows ``start:stop`` of a global batch of ``size`` items. ``start == stop``: this rank's
    share is empty and it processes the batch's last item as a stand-in, with weight 0."""

    start: int
    stop: int
    size: int

    @property
    def share(self) -> float:
        """This rank's fraction of the batch (0 for a stand-in)."""
        return (self.stop - self.start) / self.size

    @property
    def rows(self) -> slice:
        """The rows of a whole-batch tensor that this rank processes."""
        if self.stop > self.start:
            return slice(self.start, self.stop)
        return slice(self.size - 1, self.size)


def shard_of(size: int, rank: int, world: int) -> Shard:
    """Rank ``rank``'s contiguous part of a batch of ``size`` items split as evenly as possible."""
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return Shard(start, start + base + (1 if rank < extra else 0), size)


class ShardedBatches(Sampler):
    """Rank ``rank``'s shard of every batch of ``batches``, a :class:`BatchSampler` whose own
    sampler (and so the shuffling and its generator draws) is the single-process one."""

    def __init__(self, batches: BatchSampler, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield batch[shard_of(len(batch), self.rank, self.world).rows]

    def shard(self, step: int) -> Shard:
        """The shard of batch ``step`` (0-based) of an epoch."""
        items, size = len(self.batches.sampler), self.batches.batch_size
        return shard_of(min(size, items - step * size), self.rank, self.world)


# --------------------------------------------------------------------------- whole-batch layers
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient is summed over ranks too."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


class GlobalBatchNorm(nn.BatchNorm1d):
    """:class:`nn.BatchNorm1d` whose training statistics are those of the rows of every rank's
    shard together (two-pass mean and variance, as one process computes them). Eval mode uses
    the running statistics, which are the same on every rank. Same parameters and state dict."""

    def __init__(self, norm: nn.BatchNorm1d, parallel: DataParallel):
        super().__init__(
            norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats
        )
        self.load_state_dict(norm.state_dict())
        self.parallel = parallel

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(f"GlobalBatchNorm expects (rows, channels), got {tuple(x.shape)}")
        own = x if self.parallel.shard.share > 0 else x[:0]  # a stand-in adds no statistics
        totals = _AllReduceSum.apply(torch.cat([own.sum(0), own.new_tensor([own.shape[0]])]))
        count = totals[-1]
        mean = totals[:-1] / count
        centred = x - mean
        var = _AllReduceSum.apply(centred[: own.shape[0]].pow(2).sum(0)) / count
        out = centred / torch.sqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - factor).add_(factor * mean)
                self.running_var.mul_(1 - factor).add_(factor * unbiased)
        return out


def _whole_batch_like(x: Tensor, dim: int, size: int, fill: float) -> Tensor:
    """A tensor filled with ``fill`` like ``x`` (dtype, device, order of dimensions in memory)
    with ``size`` entries along ``dim``: random draws on it land on the elements that one
    process's whole-batch tensor would get."""
    shape = list(x.shape)
    shape[dim] = size
    order = sorted(range(x.dim()), key=x.stride, reverse=True)  # outermost first, stable
    stored = torch.full([shape[d] for d in order], fill, dtype=x.dtype, device=x.device)
    return stored.permute([order.index(d) for d in range(x.dim())])


class _SpikesForward(nn.Module):
    """``network.forward_with_spikes`` as a module's forward, for DistributedDataParallel."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, frames: Tensor):
        return self.network.forward_with_spikes(frames)


# --------------------------------------------------------------------------- one process
class DataParallel:
    """This process's place in a data-parallel run and the hooks the Trainer calls."""

    def __init__(self, rank: int, world_size: int, device: torch.device, backend: str):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.is_main = rank == 0
        self.shard = Shard(0, 1, 1)  # the current batch's rows, set by begin_step
        self._comm_device = device if backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ setup
    def wrap(self, network: nn.Module) -> DistributedDataParallel:
        """Give ``network`` whole-batch BatchNorm and dropout (in place; same parameters) and
        return its training forward ``frames → (readout, spikes)`` under
        DistributedDataParallel, which all-reduces the gradients."""
        for module in list(network.modules()):
            for name, child in list(module.named_children()):
                if type(child) is nn.BatchNorm1d:
                    setattr(module, name, GlobalBatchNorm(child, self).to(self.device))
        for module in network.modules():
            if isinstance(module, Dropout):
                module.batch_offset = self._shard_start
            if isinstance(module, DelRec) and module.recurrent_dropout > 0:
                module.register_forward_pre_hook(self._recurrent_mask, with_kwargs=True)
        device_ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(_SpikesForward(network), device_ids=device_ids)

    def _shard_start(self) -> int:
        """The row of the whole batch where this rank's rows start."""
        return self.shard.rows.start

    def _recurrent_mask(self, layer: DelRec, args: tuple, kwargs: dict):
        """DelRec pre-hook: this rank's rows of the recurrent dropout mask of the whole batch,
        drawn exactly as the layer draws it."""
        if not layer.training or kwargs.get("dropout_mask") is not None:
            return None
        keep = 1.0 - layer.recurrent_dropout
        first_step = args[0][0]  # (B, N)
        whole = torch.bernoulli(_whole_batch_like(first_step, 0, self.shard.size, keep)) / keep
        return args, {**kwargs, "dropout_mask": whole[self.shard.rows]}

    def shard_loader(self, loader: DataLoader) -> DataLoader:
        """This rank's loader: the batches of ``loader`` (same order, same generator), each cut
        to this rank's shard."""
        return type(loader)(
            loader.dataset,
            batch_sampler=ShardedBatches(loader.batch_sampler, self.rank, self.world_size),
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            generator=loader.generator,
            worker_init_fn=loader.worker_init_fn,
        )

    def agree(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        values = [value]
        dist.broadcast_object_list(values, src=0)
        return values[0]

    def gather(self, value) -> list:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    # ------------------------------------------------------------------ every batch
    def begin_step(self, loader: DataLoader, step: int, frames: Tensor) -> tuple[Tensor, float]:
        """Enter batch ``step`` of ``loader``: pad ``frames`` in time to the whole batch's
        longest item; returns them and this rank's share of the batch (0 for a stand-in)."""
        self.shard = loader.batch_sampler.shard(step)
        steps = int(self._all_reduce(torch.tensor([frames.shape[0]]), dist.ReduceOp.MAX)[0])
        if steps > frames.shape[0]:
            frames = F.pad(frames, (0, 0, 0, 0, 0, steps - frames.shape[0]))
        return frames, self.shard.share

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any."""
        return bool(self._all_reduce(torch.tensor([float(flag)]), dist.ReduceOp.MAX)[0])

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64)."""
        return self._all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()

    def _all_reduce(self, tensor: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        tensor = tensor.to(self._comm_device)
        dist.all_reduce(tensor, op=op)
        return tensor.cpu()

    def leave(self) -> None:
        """Leave the run together: wait for every rank, then destroy the process group. Called
        by every rank after its last collective; rank 0 tests afterwards, on its own (a rank
        that left alone could tear down its connections under a peer still using them)."""
        dist.barrier()
        dist.destroy_process_group()

    # ------------------------------------------------------------------ every epoch
    def reduce_meter(self, meter) -> None:
        """Replace the sums and counts of ``meter`` (named in its ``SUMS``) by their totals."""
        totals = self.sum([float(getattr(meter, name)) for name in meter.SUMS])
        for name, total in zip(meter.SUMS, totals):
            setattr(meter, name, type(getattr(meter, name))(total))

    def check_in_sync(self, network: nn.Module, epoch: int) -> None:
        """Raise :class:`TrainingError` unless every rank holds the same parameters and buffers
        (compared through per-tensor sums and sums of squares)."""
        tensors = [
            t.detach().double() for t in itertools.chain(network.parameters(), network.buffers())
        ]
        sums = torch.stack([t.sum() for t in tensors] + [t.pow(2).sum() for t in tensors])
        bounds = self._all_reduce(torch.cat([sums, -sums]).cpu(), dist.ReduceOp.MAX)
        if not torch.equal(bounds[: len(sums)], -bounds[len(sums) :]):
            raise TrainingError(
                f"the processes' networks differ after epoch {epoch + 1}; "
                "a layer draws randomness or keeps state this run cannot share"
            )


# --------------------------------------------------------------------------- process group
def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = resolve_device(name).type
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise ConfigError(
            f"device {name!r}: with several processes each one takes the GPU of "
            "its local rank; use --device cuda, auto or cpu"
        )
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} "
            "visible); start at most one process per GPU (--nproc-per-node)"
        )
    return torch.device("cuda", local_rank)


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


@contextlib.contextmanager
def process_group(device: str, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Join the other processes when torchrun started several (``WORLD_SIZE`` > 1) and yield
    this one's :class:`DataParallel`; yield ``None`` in a single process.

    ``device``: the config's device (each process takes ``cuda:LOCAL_RANK`` or the CPU);
    ``backend``: ``None`` for nccl on CUDA and gloo on the CPU; ``timeout_s``: how long a
    collective operation (and the start-up rendezvous) waits for a silent process before it
    fails. SIGTERM (torchrun stopping the others after one failed) raises :class:`Stopped`.
    """
    world = world_size()
    check_timeout(timeout_s)  # in one process too: a bad value is refused, not ignored
    if world == 1:
        yield None
        return
    _check_port()
    rank, local_rank = _rank("RANK", world), _rank("LOCAL_RANK", world, default="0")
    torch_device = _device(device, local_rank)
    backend = backend or ("nccl" if torch_device.type == "cuda" else "gloo")
    available = {
        "gloo": dist.is_gloo_available,
        "nccl": dist.is_nccl_available,
        "mpi": dist.is_mpi_available,
    }
    if backend not in available or not available[backend]():
        raise ConfigError(
            f"torch.distributed backend {backend!r} is not available in this torch "
            "build; use --dist-backend gloo (CPU, CUDA) or nccl (CUDA)"
        )
    if backend == "nccl" and torch_device.type != "cuda":
        raise ConfigError("the nccl backend needs CUDA devices; use --dist-backend gloo on CPU")
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        _join(backend, world, timeout_s)
        try:
            yield DataParallel(rank, world, torch_device, backend)
        finally:
            if dist.is_initialized():  # a failure before DataParallel.leave
                dist.destroy_process_group()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _join(backend: str, world: int, timeout_s: float) -> None:
    """``init_process_group``, its failures said plainly: a missing address is bad usage, a
    peer that does not join (or a port in use) a run-time failure naming what to check."""
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except ValueError as error:  # MASTER_ADDR or MASTER_PORT unset
        first = str(error).strip().splitlines()[0]
        raise ConfigError(
            f"{first}: launch with torchrun, or set MASTER_ADDR and MASTER_PORT for every process"
        ) from None
    except (RuntimeError, dist.DistError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        address, port = (os.environ.get(name, "?") for name in ("MASTER_ADDR", "MASTER_PORT"))
        raise TrainingError(
            f"the {world} processes did not all join within {timeout_s:g} s ({first}); check "
            f"that every rank started, that MASTER_ADDR {address} is the master (rank 0) and "
            f"reachable, and that MASTER_PORT {port} is free there, then run the same command "
            f"again (with a --dist-timeout above {timeout_s:g} s if the processes start further "
            "apart)"
        ) from None


def is_process_failure(error: BaseException) -> bool:
    """Whether ``error`` says another process failed or went silent (not a bug of this one)."""
    if isinstance(error, (Stopped, dist.DistError)):
        return True
    return (
        isinstance(error, RuntimeError)
        and re.search(r"gloo|nccl|connection (closed|reset|refused)|timed out", str(error), re.I)
        is not None
    )


def failure_message(error: BaseException, run_dir: Path, processes: int) -> str:
    """What happened, where the last good checkpoint is and how to continue."""
    if isinstance(error, Stopped):
        what = (
            f"stopped by {error} (torchrun sends it to every process when one fails, "
            "and reports the failing one)"
        )
    else:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        what = f"lost contact with the other processes ({first_line})"
    run = RunDir(run_dir)
    last = run.checkpoint_path("last")
    launch, several_nodes = torchrun_launch(processes)
    if not run.is_single():  # the run never wrote its configuration: nothing to resume
        return f"{what}; nothing was saved. Run the same command again ({launch} …)"
    where = (
        f"the last complete epoch is saved in {last}"
        if last.is_file()
        else "no epoch was complete, so nothing was saved"
    )
    every = " on every node, as before" if several_nodes else ""
    return f"{what}; {where}. Continue with{every}: {launch} -m delrec train --resume {run_dir}"


def resume_command(run_dir: Path, processes: int) -> str:
    """The command that continues ``run_dir`` with ``processes`` processes, launched as this
    job was."""
    launch, several_nodes = torchrun_launch(processes)
    every = " (on every node, as before)" if several_nodes else ""
    return f"{launch} -m delrec train --resume {run_dir}{every}"


def torchrun_launch(processes: int) -> tuple[str, bool]:
    """The ``torchrun`` prefix that starts ``processes`` processes as this job was started
    (``--nnodes`` where they span several nodes), and whether they do."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    several_nodes = local < processes
    nodes = f"--nnodes {processes // local} " if several_nodes else ""
    return f"torchrun {nodes}--nproc-per-node {local}", several_nodes
