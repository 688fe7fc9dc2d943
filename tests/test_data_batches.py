"""The frame contract (collate, loader), the registry's errors, and SHD augmentation."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from test_data_heidelberg import random_samples, write_heidelberg

from delrec.data import (
    DataError,
    TripleAugmented,
    collate_time_major,
    dataset_info,
    load_dataset,
    make_loader,
    settings_of,
)
from delrec.data.augment import blend, centre_of_mass, shift_channels


def test_collate_pads_time_major_and_reports_lengths():
    items = [(torch.ones(3, 2), 4), (torch.full((5, 2), 2.0), 0), (torch.full((1, 2), 3.0), 9)]
    frames, lengths, targets = collate_time_major(items)
    assert frames.shape == (5, 3, 2) and frames.dtype == torch.float32
    assert lengths.tolist() == [3, 5, 1] and lengths.dtype == torch.long
    assert targets.tolist() == [4, 0, 9] and targets.dtype == torch.long
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(frames[:n, b], items[b][0]) and not frames[n:, b].any()


def test_collate_regression_targets_are_float():
    batch = collate_time_major(
        [(torch.zeros(4, 1), torch.tensor(0.5)), (torch.zeros(4, 1), torch.tensor(1.5))]
    )
    assert batch.targets.dtype == torch.float32 and batch.targets.tolist() == [0.5, 1.5]


def test_loader_batches_and_seeded_shuffle():
    ds = load_dataset("digits-8x8", split="valid")
    batches = list(make_loader(ds, batch_size=100))
    assert [b.frames.shape for b in batches[:1]] == [(64, 100, 1)]
    assert sum(len(b.targets) for b in batches) == len(ds)
    assert torch.equal(batches[0].frames[:, 3], ds[3][0])

    def order(seed):
        return torch.cat([b.targets for b in make_loader(ds, 50, shuffle=True, seed=seed)])

    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))


def test_registry_errors_name_the_fix():
    with pytest.raises(DataError, match="unknown data set 'mnist'.*shd, ssc, psmnist"):
        load_dataset("mnist")
    with pytest.raises(DataError, match=r"unknown setting\(s\) tau_mg .*accepts: tau, horizon"):
        load_dataset("mackey-glass", tau_mg=30)
    with pytest.raises(DataError, match="unknown split 'validation'"):
        load_dataset("digits-8x8", split="validation")
    assert settings_of("ssc")["steps"] == 250
    assert dataset_info("ssc").input_size == 140 and dataset_info("ssc").num_classes == 35
    assert dataset_info("mackey-glass", window=50).steps == 50


def test_shift_moves_each_channel_within_the_limit():
    rng = np.random.default_rng(0)
    frames = rng.poisson(0.5, size=(40, 6)).astype(np.float32)
    frames[:12] = frames[-12:] = 0  # room on both sides: nothing falls out for |shift| <= 12
    shifted = shift_channels(frames, 12, np.random.default_rng(1))
    assert shifted.shape == frames.shape and shifted.sum() == frames.sum()
    offsets = []
    for c in range(6):
        found = [
            s for s in range(-12, 13) if np.array_equal(np.roll(frames[:, c], s), shifted[:, c])
        ]
        assert found
        offsets.append(found[0])
    assert len(set(offsets)) > 1  # channels move independently
    assert np.array_equal(shift_channels(frames, 0, np.random.default_rng(2)), frames)


def test_shift_drops_spikes_leaving_the_window():
    """A channel with 1 at bin 0 and 2 at bin 4 of 5, moved by the offset the generator draws:
    what lands inside stays, what leaves is dropped (no wrap-around)."""
    frames = np.zeros((5, 1), dtype=np.float32)
    frames[0, 0], frames[4, 0] = 1, 2
    seen = set()
    for seed in range(40):
        offset = int(np.random.default_rng(seed).integers(-10, 11, size=1)[0])
        out = shift_channels(frames, 10, np.random.default_rng(seed))
        expected = np.zeros((5, 1), dtype=np.float32)
        for t, count in ((0, 1), (4, 2)):
            if 0 <= t + offset < 5:
                expected[t + offset, 0] = count
        assert np.array_equal(out, expected), (seed, offset)
        seen.add(float(out.sum()))
    assert {0.0, 1.0, 2.0} <= seen  # both dropped, only the 1 kept, only the 2 kept


def test_blend_aligns_centres_of_mass_and_thins():
    a = np.zeros((6, 2), dtype=np.float32)
    a[2, 0] = 4
    b = np.zeros((10, 2), dtype=np.float32)
    b[7, 1] = 6
    full = blend(a, b, 1.0, np.random.default_rng(0))  # thin_p = 1 keeps every spike
    # b's centre (7) is 5 bins later than a's (2): a is placed 5 bins later
    assert full.shape == (11, 2) and full[7, 0] == 4 and full[7, 1] == 6 and full.sum() == 10
    assert centre_of_mass(full) == 7
    thinned = [blend(a, b, 0.5, np.random.default_rng(s)) for s in range(200)]
    assert all((t <= full).all() for t in thinned)
    assert abs(np.mean([t.sum() for t in thinned]) - 5.0) < 0.5


@pytest.fixture
def shd_train(tmp_path):
    write_heidelberg(
        tmp_path / "shd_train.h5", random_samples(30, seed=3), [i % 3 for i in range(30)]
    )
    return load_dataset("shd", split="train", root=tmp_path)


def test_triple_augmentation_keeps_labels_and_is_reproducible(shd_train):
    aug = TripleAugmented(shd_train, max_shift=5, thin_p=0.5, seed=7)
    n = len(shd_train)
    assert len(aug) == 3 * n and aug.info == shd_train.info
    with pytest.raises(IndexError):
        aug[3 * n]
    assert aug.labels.tolist() == shd_train.labels.tolist() * 3
    for i in range(n):
        assert torch.equal(aug[i][0], shd_train[i][0])
        for view in (1, 2):
            frames, label = aug[view * n + i]
            assert label == shd_train[i][1] and frames.shape[1] == 140
    shifted, _ = aug[n + 4]
    assert shifted.shape == shd_train[4][0].shape and shifted.sum() <= shd_train[4][0].sum()
    twin = TripleAugmented(shd_train, max_shift=5, thin_p=0.5, seed=7)
    assert all(torch.equal(aug[k][0], twin[k][0]) for k in range(n, 3 * n))
    aug.set_epoch(1)
    assert any(not torch.equal(aug[k][0], twin[k][0]) for k in range(n, 3 * n))
    twin.set_epoch(1)
    assert all(torch.equal(aug[k][0], twin[k][0]) for k in range(n, 3 * n))


def test_blend_partner_is_another_sample_of_the_class(shd_train):
    aug = TripleAugmented(shd_train, thin_p=1.0, seed=0)
    n = len(shd_train)
    for i in range(n):
        frames, label = aug[2 * n + i]
        own = shd_train[i][0]
        partners = [
            j
            for j in range(n)
            if j != i
            and shd_train[j][1] == label
            and frames.sum() == own.sum() + shd_train[j][0].sum()
        ]
        assert partners, f"blend of item {i} is not item {i} plus a same-class item"


def test_augmentation_works_through_the_loader(shd_train):
    aug = TripleAugmented(shd_train, seed=0)
    batches = list(make_loader(aug, batch_size=16, shuffle=True, seed=0))
    assert sum(len(b.targets) for b in batches) == 3 * len(shd_train)
    assert all(b.frames.shape[0] == int(b.lengths.max()) for b in batches)


def test_augmentation_refuses_what_would_make_empty_or_cut_items(shd_train):
    """thin_p=0 made every blend an all-zero frame with a label; a negative seed failed in
    numpy on the first access; intensities were cut to whole numbers by the blend."""
    with pytest.raises(DataError, match="0 < thin_p <= 1 .*0 would make every blend empty"):
        TripleAugmented(shd_train, thin_p=0.0)
    with pytest.raises(DataError, match="seed must be a whole number >= 0, got -1"):
        TripleAugmented(shd_train, seed=-1)
    images = TripleAugmented(load_dataset("digits-8x8", split="train"))
    assert torch.equal(images[0][0], images.base[0][0])  # the originals pass as they are
    with pytest.raises(DataError, match="takes spike counts, and item 0 of the data set"):
        images[len(images.base)]


class _SignalledInWorker(torch.utils.data.Dataset):
    """Items 0…7; a loader worker sends itself Ctrl-C and SIGTERM while it fetches item 0,
    as a terminal or a scheduler signals the whole process group."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 0 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.full((2, 1), float(i)), i


def test_loader_workers_leave_ctrl_c_and_sigterm_to_the_main_process():
    labels = [b.targets.tolist() for b in make_loader(_SignalledInWorker(), 4, num_workers=1)]
    assert labels == [[0, 1, 2, 3], [4, 5, 6, 7]]


_interrupt_at_fork = False


def _interrupt_the_parent():
    if _interrupt_at_fork:
        os.kill(os.getpid(), signal.SIGINT)


os.register_at_fork(after_in_parent=_interrupt_the_parent)


def test_ctrl_c_while_workers_start_interrupts_instead_of_being_dropped():
    """Raised inside Python's fork handlers, a KeyboardInterrupt is dropped ("Exception
    ignored"); the loader holds it while its workers start and raises it afterwards."""
    global _interrupt_at_fork
    loader = make_loader(_SignalledInWorker(), 4, num_workers=1)
    # Python's own Ctrl-C handler, also where pytest started with Ctrl-C ignored (a shell's
    # background job: `pytest &` in a script)
    launched_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    _interrupt_at_fork = True
    try:
        with pytest.raises(KeyboardInterrupt):
            iter(loader)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        _interrupt_at_fork = False
        signal.signal(signal.SIGINT, launched_with)
    assert len(list(loader)) == 2


def test_blends_keep_a_fixed_number_of_steps(tmp_path):
    """SSC's items are 250 steps, as validation and test are: a blend whose centres of mass
    put one sample later keeps 250 (it grew beyond), dropping what passes the end."""
    samples = [([0.05, 0.1], [0, 5]), ([1.2, 1.3], [0, 5])] * 3
    write_heidelberg(tmp_path / "ssc_train.h5", samples, [0] * 6)
    train = load_dataset("ssc", split="train", root=tmp_path)
    aug = TripleAugmented(train, thin_p=1.0, seed=0)
    lengths = {len(aug[i][0]) for i in range(len(aug))}
    assert lengths == {250}
