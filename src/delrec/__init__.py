"""delrec: spiking neural networks with learnable delays in recurrent connections."""

__version__ = "0.1.0"
