"""Retrieval: search (exact now, FAISS indexes later) and neighbour-list post-processing.

Everything here works on numpy arrays and never imports torch, so query and
evaluate on .npy files start fast.
"""
