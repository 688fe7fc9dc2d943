"""Truncated BPTT in training: the two-pass chunked step computes the truncated gradient of the
sequence loss, one chunk longer than the sequence is plain BPTT, backward memory grows with the
chunk, and `delrec train --set tbptt=K` trains."""

import json

import pytest
import torch
from torch import nn

from delrec.bench_state import linear_fit, peak_saved_bytes
from delrec.cli import main
from delrec.layers import DelRec
from delrec.models import NetworkConfig, build_network, preset_network
from delrec.training.objectives import make_objective
from delrec.training.tbptt import chunk_bounds, spike_tally, truncated_bptt


def small_network(readout: str, block: str, seed: int = 0) -> nn.Module:
    cfg = NetworkConfig(
        3,
        (6, 7),
        4,
        block=block,
        dropout=0.2,
        recurrent_dropout=0.3,
        readout=readout,
        delay_init="uniform:0:6",
        learn_spread=True,
        neuron=dict(reset="soft", tau=2.0),
    )
    net = build_network(cfg, seed=seed).double().train()
    for module in net.modules():
        if isinstance(module, DelRec):
            module.sigma.fill_(2.0)
    return net


def batch(readout: str, steps: int = 25, size: int = 5):
    g = torch.Generator().manual_seed(1)
    frames = torch.rand(steps, size, 3, generator=g, dtype=torch.float64) * 3
    lengths = torch.randint(steps - 6, steps + 1, (size,), generator=g)
    if readout == "ema":
        return frames, lengths, torch.randn(size, generator=g, dtype=torch.float64), "regression"
    return frames, lengths, torch.randint(0, 4, (size,), generator=g), "classification"


def gradients(net) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters() if p.requires_grad]


def chunked_graph_gradients(net, frames, lengths, targets, objective, chunk, penalty):
    """The definition: every chunk's graph kept, the state detached between chunks, the
    sequence loss (and penalty) backpropagated once."""
    outputs, spikes, state = [], [], None
    for start, end in chunk_bounds(frames.shape[0], chunk):
        out, s, state = net.forward_with_spikes(frames[start:end], state, return_state=True)
        outputs.append(out)
        spikes.append(s)
    loss, _ = objective(torch.cat(outputs), lengths, targets)
    layers = [torch.cat(layer) for layer in zip(*spikes)]
    total = loss + penalty * torch.stack([0.5 * s.pow(2).mean() for s in layers]).mean()
    net.zero_grad(set_to_none=True)
    total.backward()
    return loss.detach(), gradients(net), layers


def valid_step_rates(layers, lengths) -> list[float]:
    """Spikes per neuron per step, counting each sample's steps before its length only."""
    return [
        sum(s[:n, b].sum().item() for b, n in enumerate(lengths.tolist()))
        / (lengths.sum().item() * s.shape[2])
        for s in layers
    ]


@pytest.mark.parametrize("readout,block", [("sum", "dropout"), ("lif", "bn"), ("ema", "dropout")])
def test_two_passes_give_the_truncated_gradient_of_the_sequence_loss(readout, block):
    net = small_network(readout, block)
    frames, lengths, targets, task = batch(readout)
    objective = make_objective(task, readout)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)]
    assert bool(norms) == (block == "bn")
    seen = {norm: [] for norm in norms}  # each BatchNorm's input frames, chunk by chunk
    hooks = [n.register_forward_pre_hook(lambda m, a: seen[m].append(a[0].detach())) for n in norms]
    before = [(n.running_mean.clone(), n.running_var.clone()) for n in norms]
    torch.manual_seed(7)
    expected_loss, expected, layers = chunked_graph_gradients(
        net, frames, lengths, targets, objective, 6, 0.3
    )
    for hook in hooks:
        hook.remove()
    after = torch.get_rng_state()
    # one update per step from all its frames, as a pass without chunks makes
    expected_statistics = [
        (
            mean.lerp(torch.cat(seen[n]).mean(0), n.momentum),
            var.lerp(torch.cat(seen[n]).var(0), n.momentum),
        )
        for n, (mean, var) in zip(norms, before)
    ]
    assert all(len(seen[n]) == 5 for n in norms)  # 25 steps in chunks of 6

    net = small_network(readout, block)  # the same initial parameters and statistics
    torch.manual_seed(7)
    step = truncated_bptt(net, frames, lengths, targets, objective, 6, 0.3)
    net.zero_grad(set_to_none=True)
    step.backward()
    torch.testing.assert_close(step.loss, expected_loss, rtol=1e-12, atol=0)
    for actual, want in zip(gradients(net), expected):
        torch.testing.assert_close(actual, want, rtol=1e-9, atol=1e-12)
    # BatchNorm's running statistics take one update per step (they took one per chunk)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)]
    for norm, (mean, var) in zip(norms, expected_statistics):
        torch.testing.assert_close(norm.running_mean, mean, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(norm.running_var, var, rtol=1e-12, atol=1e-15)
        assert int(norm.num_batches_tracked) == 1
    assert torch.equal(torch.get_rng_state(), after)  # and the random stream ends where it would
    # firing rates over the valid steps only (the padding after a sample's end does not count)
    assert lengths.min() < frames.shape[0]
    assert step.firing_rates == pytest.approx(valid_step_rates(layers, lengths), rel=1e-12)
    assert all(0 < rate < 1 for rate in step.firing_rates)


def test_spike_tally_ignores_the_padding_and_weights_samples_by_their_steps():
    g = torch.Generator().manual_seed(3)
    spikes = [(torch.rand(9, 4, n, generator=g) < 0.3).float() for n in (5, 2)]
    lengths = torch.tensor([9, 3, 6, 1])
    tally = spike_tally(spikes, lengths)
    assert tally[:, 1].tolist() == [19 * 5, 19 * 2]  # neuron-steps: Σ lengths × N
    rates = (tally[:, 0] / tally[:, 1]).tolist()
    assert rates == pytest.approx(valid_step_rates(spikes, lengths), rel=1e-12)
    padded = [torch.cat([s, torch.ones(4, 4, s.shape[2])]) for s in spikes]  # spikes after the end
    assert torch.equal(spike_tally(padded, lengths), tally)
    # a chunk starting at step 4 counts only the steps 4… of each sample
    late = spike_tally([s[4:] for s in spikes], lengths, start=4)
    assert late[:, 1].tolist() == [(5 + 2) * 5, (5 + 2) * 2]


def test_truncation_changes_the_gradient_and_a_chunk_as_long_as_the_sequence_is_bptt():
    readout = "sum"
    frames, lengths, targets, task = batch(readout)
    objective = make_objective(task, readout)
    results = {}
    for chunk in (5, frames.shape[0]):
        net = small_network(readout, "dropout")
        torch.manual_seed(3)
        step = truncated_bptt(net, frames, lengths, targets, objective, chunk)
        net.zero_grad(set_to_none=True)
        step.backward()
        results[chunk] = gradients(net)
    net = small_network(readout, "dropout")
    torch.manual_seed(3)
    output, _ = net.forward_with_spikes(frames)
    loss, _ = objective(output, lengths, targets)
    net.zero_grad(set_to_none=True)
    loss.backward()
    for actual, want in zip(results[frames.shape[0]], gradients(net)):
        torch.testing.assert_close(actual, want, rtol=1e-9, atol=1e-12)
    recurrent = [i for i, p in enumerate(net.parameters()) if p.shape == (7, 7)]
    assert not torch.allclose(results[5][recurrent[0]], results[frames.shape[0]][recurrent[0]])


def test_backward_memory_grows_with_the_chunk_not_the_sequence():
    """PS-MNIST's network (784 steps): the graph kept for one chunk's backward is ∝ K."""
    cfg = preset_network("psmnist", "delrec", hidden_sizes=(16, 24, 24))
    net = build_network(cfg, seed=0).train()
    frames = torch.rand(784, 4, 1)
    peaks = {}
    for chunk in (49, 98, 196, 392, 784):
        peaks[chunk] = peak_saved_bytes(
            lambda chunk=chunk: truncated_bptt(
                net, frames, torch.full((4,), 784), torch.zeros(4, dtype=torch.long),
                make_objective("classification", "sum"), chunk,
            ).backward()
        )  # fmt: skip
    whole = peaks.pop(784)  # one chunk: no history to carry in
    per_step, constant = linear_fit(peaks)
    for chunk, peak in peaks.items():  # a constant plus the same bytes for every step of K
        assert abs(constant + per_step * chunk - peak) <= 0.01 * peak, peaks
    assert 0 <= constant < peaks[49] / 2 and whole <= constant + per_step * 784, peaks


def test_a_chunk_of_one_frame_for_batch_norm_is_refused_naming_the_settings():
    """tbptt=1 and a last batch of one item gave BatchNorm one frame: a raw ValueError from
    torch after the whole epoch. It names tbptt and batch_size."""
    from delrec.config import ConfigError

    net = small_network("lif", "bn")
    frames, lengths, targets, task = batch("lif", size=1)
    with pytest.raises(
        ConfigError, match="gives BatchNorm one frame, .* raise tbptt, or choose a batch_size"
    ):
        truncated_bptt(net, frames, lengths, targets, make_objective(task, "lif"), 1)
    truncated_bptt(net, frames, lengths, targets, make_objective(task, "lif"), 5)  # 25 = 5 × 5


def test_chunk_bounds_cover_the_sequence_and_refuse_zero():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(3, 10) == [(0, 3)]
    with pytest.raises(ValueError, match="at least 1"):
        chunk_bounds(10, 0)


def test_train_command_trains_in_chunks_and_resumes_bit_for_bit(tmp_path, capsys):
    """`delrec train --set tbptt=16` on 64-step digits: recorded in the run, the loss falls, a
    run stopped and resumed ends where an uninterrupted one does; one chunk of 64 steps trains
    exactly as without tbptt."""
    from test_train_run import TINY_DIGITS, check_kill_and_resume, read_metrics

    base = [*TINY_DIGITS, "--set", "tbptt=16", "optim.lr=1e-2"]
    check_kill_and_resume(tmp_path, capsys, base)
    document = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert document["config"]["tbptt"] == 16
    rows = read_metrics(tmp_path / "whole")
    assert float(rows[-1]["train_loss"]) < 0.9 * float(rows[0]["train_loss"])

    def metrics(name, *extra):
        run = tmp_path / name
        assert main(["train", "--epochs", "2", "--run-dir", str(run), *TINY_DIGITS, *extra]) == 0
        return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in read_metrics(run)]

    assert metrics("one-chunk", "--set", "tbptt=64") == metrics("plain")
    assert main(["train", "--run-dir", str(tmp_path / "bad"), *TINY_DIGITS, "--set", "tbptt=0"])
    assert "tbptt" in capsys.readouterr().err
