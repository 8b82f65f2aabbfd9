"""Model: the OpenCLIP image tower, pooling, the embedding head, build/save/load."""
