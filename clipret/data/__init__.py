"""Dataset layout, robust image decoding, transforms and the P×K sampler."""
