"""Analysis: the S3 gradient argument (spectral radius, measured gradients), sweeps, comparisons."""
