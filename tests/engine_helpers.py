"""What the engine tests share: the neuron options they draw and their gradient tolerance."""

import torch
from hypothesis import strategies as st

from delrec.neurons import LIF, ATan, Triangle

NEURONS = st.builds(
    LIF,
    tau=st.sampled_from([1.5, 2.0, 5.0]),
    v_threshold=st.sampled_from([0.5, 1.0]),
    v_reset=st.sampled_from([0.0, -0.3, None]),  # None = soft reset
    detach_reset=st.booleans(),
    decay_input=st.booleans(),
    surrogate=st.one_of(
        st.builds(Triangle, gamma=st.sampled_from([0.5, 1.0])),
        st.builds(ATan, alpha=st.sampled_from([2.0, 5.0])),
    ),
)


def assert_close_relative(actual, expected, rtol=1e-6):
    """Equal within ``rtol`` relative to the largest entry of ``expected``."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-12)
