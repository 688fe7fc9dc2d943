"""Learning check for the PS-MNIST family on real images: the `psmnist-mini` preset (its
neuron, block, readout without bias, optimizers and one-cycle schedules, 7 × 7 images read as
49-step permuted sequences) cut down to one 64-neuron DelRec layer and 1,000 training images.

Eight epochs (about 15 CPU-seconds) reach about 20 % test accuracy (seed 0: validation 0.10,
0.10, 0.14, 0.18, 0.20, 0.20, 0.18, 0.18; test 0.205); a network that does not learn stays at
the 10 % of chance, which on the 1,000 test images has a standard deviation of 1 point. The
full preset and its figures: docs/results.md#ps-mnist-on-psmnist-mini.
"""

import pytest
import torch

from delrec.training import Trainer, resolve


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The presets run on one CPU thread (``threads = 1``); give the next tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_psmnist_recipe_learns_real_digits(tmp_path):
    config = resolve(
        "psmnist-mini",
        "delrec",
        overrides=["max_train_samples=1000", "network.hidden_sizes=[64]", "epochs=8"],
    )
    assert config.network["readout_bias"] is False and config.data["side"] == 7
    trainer = Trainer(config, tmp_path / "run", progress=False, log=lambda message: None)
    trainer.fit()
    history = trainer.state.history
    assert history[0]["valid_accuracy"] < 0.13  # it starts at chance
    assert all(row["firing_rate_0"] > 0 for row in history)  # the layer is not silent
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    accuracy = trainer.test()["accuracy"]
    assert accuracy >= 0.16, f"test accuracy {accuracy:.3f}: chance is 0.10"
