"""The training loop: network, optimizers, schedules, epochs, checkpoints, resume, test.

The Trainer writes its run directory through :class:`delrec.runs.RunDir` (which describes the
layout; docs/training.md#run-directory). Reproducibility: the network is initialised from
``seed``; dropout draws from the global torch RNG seeded with ``seed``; the training loader
shuffles with its own generator; SHD augmentation is a function of (seed, epoch, index).
``last.pt`` stores the RNG and loader states, optimizers, schedulers and epoch, so a resumed
run ends bit for bit where an uninterrupted one does (same device and thread count).

With a :class:`~delrec.training.distributed.DataParallel` (``torchrun``), the Trainer runs
one shard of every batch and computes what one process computes on the whole batch; rank 0
alone writes files and logs (docs/distributed.md).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from delrec import cpu
from delrec.checkpoint import CheckpointError, network_payload, unusable
from delrec.config import (
    ConfigError,
    TrainConfig,
    check_new_seed,
    differences,
    resolve_device,
)
from delrec.data.core import sample_digest
from delrec.delays import spread_schedule
from delrec.layers import DelRec, FeedforwardDelay, clamp_delays, delay_parameters, set_spread
from delrec.models import SpikingNetwork, build_network
from delrec.runs import RESULTS, RunDir, RunError, eval_loader, load_checkpoint, load_splits
from delrec.training.evaluation import evaluate
from delrec.training.objectives import make_objective, spike_penalty
from delrec.training.tbptt import ForwardPass, spike_tally, truncated_bptt


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a run directory in the wrong state)."""


# --------------------------------------------------------------------------- pieces
CGROUP_LIMIT = "/sys/fs/cgroup/memory.max"  # a container's or a batch job's (cgroup v2)


def device_memory(device: torch.device) -> int:
    """The memory of ``device`` in bytes: for the CPU, the machine's RAM or this process's
    cgroup limit, whichever is lower."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open(CGROUP_LIMIT, encoding="ascii") as limit:
            return min(memory, int(limit.read()))
    except (OSError, ValueError):  # no cgroup v2, or "max": no limit
        return memory


def check_memory(network_config, device: torch.device) -> None:
    """A TrainingError naming the sizes when the network's weights, their gradients and Adam's
    two moments (4 float32 copies) would not fit in the memory of ``device``: checked before
    any allocation, as the kernel kills a process that overcommits instead of raising."""
    training_bytes = 4 * 4 * network_config.weight_count()
    if training_bytes > device_memory(device):
        _too_large(network_config, device, f"about {training_bytes / 1e9:.3g} GB to train")


def _too_large(network_config, device: torch.device, need: str = "") -> None:
    raise TrainingError(
        f"the network's weights do not fit in the memory of {device} (hidden_sizes "
        f"{list(network_config.hidden_sizes)}, {network_config.input_size} inputs"
        f"{f'; {need}, more than {device} has' if need else ''}); set smaller "
        "network.hidden_sizes"
    ) from None


def _build_in_memory(network_config, seed: int, device: torch.device) -> SpikingNetwork:
    """``build_network`` on ``device`` after :func:`check_memory`, or a TrainingError naming
    the sizes when the allocator refuses anyway (its error is a traceback about bytes)."""
    check_memory(network_config, device)
    try:
        return build_network(network_config, seed=seed).to(device)
    except (RuntimeError, MemoryError) as error:
        if "allocate" not in str(error) and not isinstance(error, MemoryError):
            raise
    _too_large(network_config, device)


def delay_tensors(network: SpikingNetwork) -> dict[str, Tensor]:
    """The delays of each delay-holding layer by name: ``rec{i}`` (DelRec in hidden layer i,
    steps) and ``ff{i}`` (feedforward positions into hidden layer i, steps)."""
    named = {}
    for i, block in enumerate(network.blocks):
        if isinstance(block.synapses, FeedforwardDelay):
            named[f"ff{i}"] = block.synapses.position.detach()
        if isinstance(block.neurons, DelRec):
            named[f"rec{i}"] = block.neurons.delay.detach()
    return named


def parameter_groups(network: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters split into ``weights`` (with weight decay), ``no_decay`` (biases
    and BatchNorm parameters) and ``positions`` (delays, spread logits, feedforward positions)."""
    positions, no_decay = set(delay_parameters(network)), set()
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            no_decay.update(module.parameters(recurse=False))
    groups = {"weights": [], "no_decay": [], "positions": []}
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter in positions:
            groups["positions"].append(parameter)
        elif parameter in no_decay or name.endswith("bias"):
            groups["no_decay"].append(parameter)
        else:
            groups["weights"].append(parameter)
    return groups


def make_optimizers(network: nn.Module, config: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    """``{"weights": …, "positions": …}`` (positions only when the network learns delays)."""
    optim = config.optim
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optim.optimizer]
    groups = parameter_groups(network)
    weight_groups = [
        g
        for g in (
            {"params": groups["weights"], "weight_decay": optim.weight_decay},
            {"params": groups["no_decay"], "weight_decay": 0.0},
        )
        if g["params"]
    ]
    optimizers = {"weights": kind(weight_groups, lr=optim.lr)}
    if groups["positions"]:
        optimizers["positions"] = kind(
            [{"params": groups["positions"], "weight_decay": optim.position_weight_decay}],
            lr=optim.position_lr,
        )
    return optimizers


ONE_CYCLE_START, ONE_CYCLE_END = 25, 25 * 1e4  # lr / these: one-cycle's first and last rates
SHORT_ONE_CYCLE = 2  # epochs: at most this many spend half their training at the schedule's end


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, epochs: int):
    """A schedule stepped once per epoch: one-cycle peaking at the optimizer's lr, cosine
    annealing from it to 0 over ``epochs``, or ``None`` for a constant rate."""
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=epochs,
            div_factor=ONE_CYCLE_START,
            final_div_factor=ONE_CYCLE_END / ONE_CYCLE_START,
        )
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return None


def short_schedule_notes(config: TrainConfig, optimizers: dict) -> list[str]:
    """Notes for the one-cycle schedules of ``optimizers`` (:func:`make_optimizers`) too short
    to train: stepped once per epoch, one-cycle spends its last epoch at ``lr / 250000``, so
    with one or two epochs most of the training runs at about no rate at all."""
    if config.epochs > SHORT_ONE_CYCLE:
        return []
    notes = []
    for group, option, kind, lr in (
        ("weights", "optim.scheduler", config.optim.scheduler, config.optim.lr),
        (
            "positions",
            "optim.position_scheduler",
            config.optim.position_scheduler,
            config.optim.position_lr,
        ),
    ):
        if kind == "onecycle" and group in optimizers:
            notes.append(
                f"note: {option}=onecycle over {config.epochs} epoch(s) barely trains: stepped "
                f"once per epoch, it runs its last epoch at lr/{ONE_CYCLE_END:.0f} "
                f"({lr / ONE_CYCLE_END:.3g} "
                f"here); give --epochs {SHORT_ONE_CYCLE + 1} or more, or --set {option}=cosine"
            )
    return notes


def layer_parameters(network: SpikingNetwork) -> dict[str, list[nn.Parameter]]:
    """The trainable weights and biases of each hidden layer (``"0"``, ``"1"`` …) and of the
    readout (``"readout"``), in depth order; delays, spreads and feedforward positions are left
    out (they have their own optimizer)."""
    positions = set(parameter_groups(network)["positions"])
    modules = {str(i): [block] for i, block in enumerate(network.blocks)}
    modules["readout"] = [m for m in (network.readout, network.readout_neuron) if m is not None]
    return {
        name: [p for m in group for p in m.parameters() if p.requires_grad and p not in positions]
        for name, group in modules.items()
    }


def gradient_norms(layers: dict[str, list[nn.Parameter]]) -> Tensor:
    """The L2 norm of the current gradient of each entry of :func:`layer_parameters`, ``(L,)``
    float64 on the CPU (0 for a layer without gradient)."""
    norms = torch.zeros(len(layers), dtype=torch.float64)
    for index, params in enumerate(layers.values()):
        grads = [p.grad.detach() for p in params if p.grad is not None]
        if grads:
            norms[index] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    return norms


# --------------------------------------------------------------------------- run state
@dataclass
class RunState:
    """What changes from epoch to epoch and is saved in ``last.pt``."""

    epoch: int = 0  # epochs completed
    best_epoch: int | None = None
    best_value: float | None = None
    history: list = field(default_factory=list)
    initial_delays: dict = field(default_factory=dict)


class Trainer:
    """Trains one seed of one configuration in one run directory.

    ``progress``: show a tqdm bar per epoch (on stderr). Use :meth:`fit` then :meth:`test`.
    ``dist``: this process's :class:`~delrec.training.distributed.DataParallel` in a run of
    several processes; only rank 0 (``is_main``) logs, writes files and tests. It applies the
    process settings of :func:`delrec.cpu.configure` (as the command line does), so that a
    script that trains through it gets them too.
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | os.PathLike,
        progress: bool = True,
        log=None,
        dist=None,
    ):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        # validated, with sections given as dicts built: delrec.config.resolve makes one from
        # a preset, which a TrainConfig(...) written by hand does not have
        self.config = config = TrainConfig.from_dict(config.to_dict())
        self.run = RunDir(run_dir)
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.progress = progress and self.is_main
        self._said_no_gradient = False  # the note of an epoch without gradient, once a run
        self._run_is_ours = False  # until restore() or a first fit(): a new run needs an empty one
        self.log = log or (lambda message: tqdm.write(message, file=sys.stderr))
        if not self.is_main:
            self.log = lambda message: None
        self.device = resolve_device(config.device) if dist is None else dist.device
        cpu.configure()  # (again, where the command line did: the same settings)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        if config.tbptt is not None and dist is not None:  # a setting, not a run-time failure
            raise ConfigError(
                "tbptt (truncated BPTT) does not run data-parallel yet; train it in one process"
            )

        torch.manual_seed(config.seed)
        self.data = load_splits(config)
        info = self.data.info
        self._network = _build_in_memory(
            config.network_config(info.input_size, info.output_size), config.seed, self.device
        )
        self.train_forward = self.network.forward_with_spikes
        if dist is not None:
            self.train_forward = dist.wrap(self.network)
        self.objective = make_objective(
            info.task, self.network.config.readout, self.data.standardization
        )
        self.optimizers = make_optimizers(self.network, config)
        schedule_kinds = {
            "weights": config.optim.scheduler,
            "positions": config.optim.position_scheduler,
        }
        self.schedulers = {
            name: make_scheduler(opt, schedule_kinds[name], config.epochs)
            for name, opt in self.optimizers.items()
        }
        self.weight_parameters = [
            p for g in self.optimizers["weights"].param_groups for p in g["params"]
        ]
        self.layer_parameters = layer_parameters(self.network)
        self.learns_delays = any(
            isinstance(m, DelRec) and m.learn_delays for m in self.network.modules()
        )
        self.state = RunState(
            initial_delays={k: v.cpu().clone() for k, v in delay_tensors(self.network).items()}
        )
        self.valid_loader = eval_loader(
            self.data.datasets["valid"], config.eval_batch_size, config.num_workers
        )
        if dist is not None:
            self.data.train_loader = dist.shard_loader(self.data.train_loader)
            self.valid_loader = dist.shard_loader(self.valid_loader)

    @property
    def network(self) -> SpikingNetwork:
        """The network being trained (fixed: the optimizers and the forward are built on it;
        a network of your own trains through the layers' API, docs/layer.md)."""
        return self._network

    # ------------------------------------------------------------------ files
    def write_config(self) -> None:
        """``config.json``: the resolved config and the data set's sizes (rank 0 only)."""
        if not self.is_main:
            return
        self.run.write_config(self.config, self.dataset_record())

    def dataset_record(self) -> dict:
        """What ``config.json`` records of the data set: its name, sizes, item counts and a
        digest of a few validation and test items (a resume compares them with the data it
        finds; the training split is left out, as augmentation makes its items per epoch)."""
        info, datasets = self.data.info, self.data.datasets
        return {
            "name": info.name,
            "task": info.task,
            "input_size": info.input_size,
            "output_size": info.output_size,
            "steps": info.steps,
            **{f"{split}_items": len(datasets[split]) for split in ("train", "valid", "test")},
            "items_digest": sample_digest([datasets["valid"], datasets["test"]]),
        }

    # ------------------------------------------------------------------ schedule
    def sigma(self, epoch: int) -> float:
        """The spread σ (steps) of ``epoch``; 0 for networks that do not learn delays."""
        if not self.learns_delays:
            return 0.0
        spread = self.config.spread
        return spread_schedule(epoch, self.config.epochs, spread.sigma0, spread.gamma)

    # ------------------------------------------------------------------ epochs
    def train_epoch(self, epoch: int, sigma: float) -> dict[str, float]:
        """One pass over the training loader; returns the epoch's training metrics, the firing
        rate of each hidden layer (``firing_rate_<i>``, spikes per neuron per step before each
        sample's end: :func:`spike_tally`) and their mean (``firing_rate``), and the mean over
        batches of each layer's gradient norm (``grad_norm_<i>``, ``grad_norm_readout``:
        weights and biases, before clipping)."""
        config, network = self.config, self.network
        network.train()
        meter, batches = self.objective.meter(), 0
        tally = torch.zeros(len(network.blocks), 2, dtype=torch.float64)  # spikes, neuron-steps
        norm_sums = torch.zeros(len(self.layer_parameters), dtype=torch.float64)
        bar = tqdm(
            self.data.train_loader,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="batch",
            leave=False,
            file=sys.stderr,
            disable=None if self.progress else True,  # None: off where stderr is no terminal
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        samples = 0
        for step, (frames, lengths, targets) in enumerate(bar):
            frames, targets = frames.to(self.device), targets.to(self.device)
            share = 1.0
            if self.dist is not None:  # this rank's shard of the batch
                frames, share = self.dist.begin_step(self.data.train_loader, step, frames)
            forward = self._forward(frames, lengths, targets, share)
            self._check_loss(forward.loss, epoch, batches + 1)
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            forward.backward()
            norm_sums += gradient_norms(self.layer_parameters)
            if config.optim.grad_clip is not None:
                nn.utils.clip_grad_value_(self.weight_parameters, config.optim.grad_clip)
            for optimizer in self.optimizers.values():
                optimizer.step()
            self._check_finite(epoch, batches + 1)  # before the clamp, which hides an Inf delay
            clamp_delays(network)

            if share > 0:
                meter.update(forward.loss, forward.prediction, targets)
                tally += forward.spikes
            batches += 1
            samples += len(targets) if self.dist is None else self.dist.shard.size
            if self.progress:  # rank 0's shard so far, in a distributed run
                self._show_progress(bar, meter, sigma, samples / (time.perf_counter() - start))
        bar.close()
        if self.dist is not None:
            self.dist.reduce_meter(meter)
            tally = torch.tensor(self.dist.sum(tally.flatten().tolist())).view_as(tally)
            self.dist.check_in_sync(network, epoch)
        rates = (tally[:, 0] / tally[:, 1]).tolist()
        norms = (norm_sums / batches).tolist()
        return {
            **meter.result(),
            "firing_rate": sum(rates) / len(rates),
            **{f"firing_rate_{i}": rate for i, rate in enumerate(rates)},
            **{f"grad_norm_{name}": n for name, n in zip(self.layer_parameters, norms)},
        }

    def _forward(self, frames, lengths, targets, share: float) -> ForwardPass:
        """The forward pass of one training step: in chunks with ``config.tbptt``
        (:func:`truncated_bptt`), else at once. ``share``: this process's part of the batch (its
        loss is scaled so that DDP's average over processes is the whole batch's mean)."""
        config = self.config
        if config.tbptt is not None:
            return truncated_bptt(
                self.network, frames, lengths, targets, self.objective, config.tbptt,
                config.rate_penalty,
            )  # fmt: skip
        output, spikes = self.train_forward(frames)
        loss, prediction = self.objective(output, lengths, targets)
        tally = spike_tally(spikes, lengths)

        def backward() -> None:
            total = loss
            if config.rate_penalty > 0:
                total = loss + config.rate_penalty * spike_penalty(spikes)
            if self.dist is not None:
                total = total * (self.dist.world_size * share)
            total.backward()

        return ForwardPass(loss, prediction, tally, backward)

    def _check_same_data(self) -> None:
        """A RunError when the data set found differs from the one ``config.json`` says the
        run trained on (another ``--data-root`` given on resume): its sizes, item counts or
        the digest of its items (a run written before the digest is checked without it)."""
        recorded, found = self.run.read_dataset(), self.dataset_record()
        differ = [
            f"{key} {found[key]} now, {recorded[key]} when it trained"
            if key != "items_digest"
            else "its validation and test items differ from the same items when it trained"
            for key in found
            if key in recorded and recorded[key] != found[key]
        ]
        if differ:
            where = f" in {self.config.data_root}" if self.config.data_root else ""
            raise RunError(
                f"the data set{where} is not the one {self.run.path} trained on "
                f"({', '.join(differ)}): resume with the run's own data (--data-root, where "
                "its files are)"
            )

    def _check_loss(self, loss: Tensor, epoch: int, batch: int) -> None:
        """A TrainingError when the loss (of any process) is not finite."""
        failed = not torch.isfinite(loss)
        if self.dist is not None:
            failed = self.dist.any(failed)
        if failed:
            value = loss.item() if not torch.isfinite(loss) else "non-finite in another process"
            raise TrainingError(
                f"the training loss became {value} in epoch {epoch + 1}, batch {batch}; "
                f"{self._divergence_advice()}"
            )

    def _show_progress(self, bar, meter, sigma: float, samples_per_s: float) -> None:
        running, metric = meter.result(), self.objective.metric
        bar.set_postfix(
            {
                "loss": f"{running['loss']:.4g}",
                metric: f"{running[metric]:.4g}",
                "σ": f"{sigma:.3g}",
                "samples/s": f"{samples_per_s:.0f}",
            }
        )

    def fit(self, max_epochs_this_run: int | None = None) -> bool:
        """Train until ``config.epochs`` (or ``max_epochs_this_run`` more epochs); returns
        True when the run is complete. ``config.json`` is written first, and every epoch ends
        with ``last.pt`` and ``metrics.csv``: a run directory that ``delrec eval``, ``compare``
        and ``report`` read. A new run (no :meth:`restore` before) needs an empty directory: a
        RunError otherwise, before anything is written."""
        if self.is_main and not self._run_is_ours and not self.run.is_unstarted():
            raise RunError(
                f"run directory {self.run.path} already holds a run, which a new one would "
                "overwrite; give another run directory, or continue that run: call "
                "restore() before fit()"
            )
        if not self._run_is_ours:
            check_new_seed(self.config.seed)
        self._run_is_ours = True  # a later fit() continues it
        self.write_config()
        config, state = self.config, self.state
        metric = self.objective.metric
        done_this_run = 0
        while state.epoch < config.epochs:
            if max_epochs_this_run is not None and done_this_run >= max_epochs_this_run:
                return False
            epoch = state.epoch
            start = time.perf_counter()
            sigma = self.sigma(epoch)
            set_spread(self.network, sigma)
            if self.data.augmented is not None:
                self.data.augmented.set_epoch(epoch)
            lrs = {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}
            train = self.train_epoch(epoch, sigma)
            valid, _ = evaluate(
                self.network, self.valid_loader, self.objective, self.device, dist=self.dist
            )
            for scheduler in self.schedulers.values():
                if scheduler is not None:
                    scheduler.step()
            row = self._metrics_row(epoch, train, valid, lrs, sigma)
            row["epoch_time_s"] = time.perf_counter() - start
            state.history.append(row)
            state.epoch = epoch + 1
            value = valid[metric]
            better = state.best_value is None or (
                value > state.best_value
                if self.objective.higher_is_better
                else value < state.best_value
            )
            if better:
                state.best_epoch, state.best_value = epoch + 1, value
                if self.is_main:
                    self.run.save_checkpoint("best", self._best_payload(valid))
            if self.is_main:
                self.run.save_checkpoint("last", self._last_payload())
                self.run.write_metrics(state.history)
            done_this_run += 1
            self.log(
                f"epoch {epoch + 1}/{config.epochs}  σ {sigma:.3g}  "
                f"train loss {train['loss']:.4g} {metric} {train[metric]:.4g}  "
                f"valid loss {valid['loss']:.4g} {metric} {valid[metric]:.4g}"
                f"{'  *best' if better else ''}  ({row['epoch_time_s']:.1f} s)"
            )
            norms = [value for key, value in train.items() if key.startswith("grad_norm_")]
            if not any(norms) and not self._said_no_gradient:
                self._said_no_gradient = True  # once a run
                self.log(
                    f"note: no gradient reached any weight in epoch {epoch + 1} (every layer's "
                    "gradient norm is 0), so the network does not learn: a setting may silence "
                    "it (a neuron or readout τ so long that its input current vanishes, a "
                    "threshold no current reaches); see the settings in config.json"
                )
        return True

    def _metrics_row(self, epoch: int, train: dict, valid: dict, lrs: dict, sigma: float) -> dict:
        """The ``metrics.csv`` row of an epoch (its time added by the caller)."""
        metric = self.objective.metric
        row = {
            "epoch": epoch + 1,
            "train_loss": train["loss"],
            f"train_{metric}": train[metric],
            "valid_loss": valid["loss"],
            f"valid_{metric}": valid[metric],
            "lr_weights": lrs["weights"],
            "lr_positions": lrs.get("positions", 0.0),
            "sigma": sigma,
        }
        for name, delays in delay_tensors(self.network).items():
            row[f"delay_mean_{name}"] = float(delays.float().mean())
            row[f"delay_std_{name}"] = float(delays.float().std(correction=0))
        row.update({k: v for k, v in train.items() if k.startswith(("firing_rate", "grad_"))})
        return row

    # ------------------------------------------------------------------ divergence
    def _check_finite(self, epoch: int, batch: int) -> None:
        """Stop the run (TrainingError) when an optimizer step has left a parameter or a
        floating-point buffer of the network NaN or infinite; one device sync per step. (With
        a finite loss, NaN weights go unnoticed: NaN membranes never spike.)"""
        tensors = [
            *self.network.named_parameters(),
            *((n, b) for n, b in self.network.named_buffers() if b.is_floating_point()),
        ]
        if bool(torch.stack([torch.isfinite(t).all() for _, t in tensors]).all()):
            return
        bad = [name for name, t in tensors if not bool(torch.isfinite(t).all())]
        raise TrainingError(
            f"{', '.join(bad)} became NaN or infinite in the optimizer step of epoch "
            f"{epoch + 1}, batch {batch}; {self._divergence_advice()}"
        )

    def _divergence_advice(self) -> str:
        """What to do after the run diverged, and which checkpoint is the last good one."""
        advice = "lower optim.lr (or optim.position_lr) or set optim.grad_clip and train again"
        if self.state.epoch == 0 or not self.run.has_checkpoint("last"):
            return f"{advice}; no epoch has completed, so this run has no checkpoint"
        last = f"{self.run.checkpoint_path('last')} (after epoch {self.state.epoch})"
        if self.state.best_epoch is not None and self.run.has_checkpoint("best"):
            last += (
                f", the best one {self.run.checkpoint_path('best')} (epoch {self.state.best_epoch})"
            )
        return f"{advice}; the last good checkpoint is {last}"

    # ------------------------------------------------------------------ checkpoints
    def _common_payload(self) -> dict:
        payload = {
            **network_payload(self.network),
            "train_config": self.config.to_dict(),
            "epoch": self.state.epoch,
        }
        if self.data.permutation is not None:
            payload["data_permutation"] = self.data.permutation
        if self.data.standardization is not None:
            payload["standardization"] = self.data.standardization
        return payload

    def _best_payload(self, valid: dict) -> dict:
        return {**self._common_payload(), "kind": "best", "valid": valid}

    def _last_payload(self) -> dict:
        state = self.state
        rng = {
            "torch": torch.get_rng_state(),
            "loader": self.data.train_loader.generator.get_state(),
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            **self._common_payload(),
            "kind": "last",
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items() if s is not None},
            "rng": rng,
            "best_epoch": state.best_epoch,
            "best_value": state.best_value,
            "history": state.history,
            "initial_delays": state.initial_delays,
        }

    def restore(self) -> bool:
        """Continue from ``checkpoints/last.pt`` if it exists; returns True if it did. Without
        it the run starts over, unless it got further than a first epoch cut short (a kill
        between its ``best.pt`` and its ``last.pt``): then a RunError, since starting over
        would overwrite its results."""
        self._run_is_ours = True
        if not self.run.has_checkpoint("last"):
            progress = [
                name
                for name, there in (
                    ("metrics.csv", bool(self.run.read_metrics())),
                    ("test_results.json", (self.run.path / RESULTS).is_file()),
                )
                if there
            ]
            if progress:
                raise RunError(
                    f"{self.run.checkpoint_path('last')} is missing, but {self.run.path} holds "
                    f"{' and '.join(progress)}: the run got further than its first epoch, and "
                    f"starting over would overwrite its results; restore last.pt, or "
                    f"{self.run.train_again()}"
                )
            return False
        payload = load_checkpoint(
            self.run.path,
            "last",
            fix="the run cannot continue from it: restore last.pt from a copy, or "
            f"{self.run.train_again()}",
        )
        differ = differences(
            self.config.to_dict(), payload.get("train_config", {}), "config.json", "last.pt"
        )
        if differ:
            raise RunError(
                f"{self.run.checkpoint_path('last')} was written by another configuration than "
                f"config.json ({differ}); restore config.json, or resume the run last.pt belongs "
                "to (a run's settings, its epochs too, stay as it started: train longer in a new "
                "--run-dir)"
            )
        self._check_same_data()
        try:
            self.network.load_state_dict(payload["model"])
            for name, optimizer in self.optimizers.items():
                optimizer.load_state_dict(payload["optimizers"][name])
            for name, scheduler in self.schedulers.items():
                if scheduler is not None:
                    scheduler.load_state_dict(payload["schedulers"][name])
            torch.set_rng_state(payload["rng"]["torch"])
            self.data.train_loader.generator.set_state(payload["rng"]["loader"])
            if "cuda" in payload["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(payload["rng"]["cuda"], self.device)
            self.state = RunState(
                payload["epoch"],
                payload["best_epoch"],
                payload["best_value"],
                list(payload["history"]),
                dict(payload["initial_delays"]),
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(
                f"{self.run.checkpoint_path('last')} cannot be resumed from "
                f"({unusable(error)}): it was edited or written by another version of delrec; "
                f"resume with the version that wrote it, or {self.run.train_again()}"
            ) from None
        if self.state.best_epoch is not None:  # the test measures it: found lost now, not after
            self._best_checkpoint()  # the epochs still to train
        if self.is_main:
            self.run.write_metrics(self.state.history)
        return True

    def _best_checkpoint(self) -> dict:
        """The run's ``best.pt``; a RunError or CheckpointError that says what its loss costs
        when it is missing or damaged."""
        lost = (
            "the run's best-validation network is lost: restore best.pt from a copy, or "
            f"{self.run.train_again()} (delrec eval {self.run.path} --checkpoint last "
            "measures the last epoch's network)"
        )
        if not self.run.has_checkpoint("best"):
            raise RunError(f"{self.run.checkpoint_path('best')} is missing; {lost}")
        return load_checkpoint(self.run.path, "best", fix=lost)

    # ------------------------------------------------------------------ test
    def test(self) -> dict:
        """Evaluate the best-validation network on the test split (integer delays), write
        ``test_results.json`` and the figures; returns the results."""
        from delrec.training import figures

        final_network = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        end_delays = {k: v.cpu() for k, v in delay_tensors(self.network).items()}
        best = self._best_checkpoint()
        self.network.load_state_dict(best["model"])
        test_set = self.data.datasets["test"]
        loader = eval_loader(test_set, self.config.eval_batch_size, self.config.num_workers)
        metrics, outputs = evaluate(
            self.network, loader, self.objective, self.device, keep_outputs=True
        )
        results = {
            "split": "test",
            "checkpoint": "best",
            "best_epoch": best["epoch"],
            "delays": "integer",
            "items": len(test_set),
            **metrics,
            "valid": best["valid"],
        }
        self.run.write_results(results)

        figure = self.run.figure_path
        figures.learning_curves(
            self.state.history, self.objective.metric, figure("learning_curves")
        )
        figures.training_dynamics(
            {"seed " + str(self.config.seed): self.state.history},
            self.objective.metric,
            figure("training"),
        )
        if end_delays:
            figures.delay_histograms(self.state.initial_delays, end_delays, figure("delays"))
        frames, _ = test_set[0]
        with torch.no_grad():
            self.network.eval()
            _, spikes = self.network.forward_with_spikes(frames.unsqueeze(1).to(self.device))
        figures.spike_raster([s[:, 0].cpu() for s in spikes], figure("raster"))
        if self.objective.task == "regression":
            targets = torch.stack([test_set[i][1] for i in range(len(test_set))])
            mean, std = self.data.standardization if self.config.standardize else (0.0, 1.0)
            figures.prediction(
                targets * std + mean, outputs * std + mean, metrics, figure("prediction")
            )
        self.network.load_state_dict(final_network)
        return results
