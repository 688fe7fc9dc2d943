"""Learning check: a task whose answer needs a delay longer than the neurons' own memory.

A cue on one of two input channels at t = 0, 1 (the class), sparse distractor spikes on both
channels afterwards, and a readout that only looks at the last 4 of 32 steps. LIF neurons
with τ= 2 forget the cue within a few steps, so a vanilla recurrent layer stays near chance
while learned recurrent delays can carry the cue across the gap.
"""

import torch
from torch import nn

from delrec.delays import spread_schedule
from delrec.layers import DelRec, clamp_delays, set_spread
from delrec.neurons import LIF, Triangle

T, HIDDEN = 32, 16


def delayed_cue_task(n: int, generator: torch.Generator):
    labels = torch.randint(0, 2, (n,), generator=generator)
    x = (torch.rand(T, n, 2, generator=generator) < 0.03).float()
    x[0:2, torch.arange(n), labels] = 1.0
    return x, labels


class CueNet(nn.Module):
    def __init__(self, recurrent: DelRec):
        super().__init__()
        self.encoder, self.recurrent, self.readout = (
            nn.Linear(2, HIDDEN),
            recurrent,
            nn.Linear(HIDDEN, 2),
        )
        with torch.no_grad():
            self.encoder.weight.mul_(3.0)

    def forward(self, x):
        return self.readout(self.recurrent(self.encoder(x)))[-4:].sum(0)


def train_and_test(model: str, seed: int = 0, steps: int = 60) -> float:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    neuron = LIF(tau=2.0, v_reset=None, surrogate=Triangle())
    recurrent = (
        DelRec(HIDDEN, neuron, delay_init="uniform:0:30")
        if model == "delrec"
        else DelRec.vanilla(HIDDEN, neuron)
    )
    net = CueNet(recurrent)
    weights = torch.optim.Adam(
        [p for n, p in net.named_parameters() if n != "recurrent.delay"], lr=1e-2
    )
    positions = torch.optim.Adam([recurrent.delay], lr=0.5) if recurrent.learn_delays else None
    for step in range(steps):
        set_spread(net, spread_schedule(step, steps, sigma0=4.0))
        x, y = delayed_cue_task(32, generator)
        loss = nn.functional.cross_entropy(net(x), y)
        for optimizer in filter(None, (weights, positions)):
            optimizer.zero_grad()
        loss.backward()
        for optimizer in filter(None, (weights, positions)):
            optimizer.step()
        clamp_delays(net)
    x, y = delayed_cue_task(1000, torch.Generator().manual_seed(999))
    with torch.no_grad():
        return (net.eval()(x).argmax(-1) == y).float().mean().item()  # integer delays


def test_learned_delays_bridge_a_gap_that_a_vanilla_rsnn_cannot():
    delrec, rsnn = train_and_test("delrec"), train_and_test("rsnn")
    assert delrec >= 0.9, delrec
    assert rsnn <= 0.7, rsnn
