"""Every file format clipret reads or writes, in one package.

* :mod:`~clipret.artifacts.embeddings`: ``x.npy`` (N, D) float32, L2-normalised
  rows, plus ``x.json`` (the manifest: ids, dim, model fingerprint, flags,
  skipped images);
* :mod:`~clipret.artifacts.results`: ``results.json``, a list of
  ``{"filename", "samples", "scores"}``;
* :mod:`~clipret.artifacts.index`: ``gallery.faiss`` + ``gallery.faiss.json``, a
  FAISS index and its sidecar (ids, type, parameters), written as a pair;
* :mod:`~clipret.artifacts.model`: a model folder (``config.json`` +
  ``model.safetensors``) and training checkpoints (read back with
  ``torch.load(weights_only=True)``).

All writes are atomic (see :mod:`clipret.artifacts.atomic`): a process killed
at any moment leaves either the old file or the complete new one.

torch is imported only inside the functions that need it, so ``query`` and
``evaluate`` on .npy files never pay for it.
"""

from clipret.artifacts.atomic import (
    atomic_open,
    atomic_path,
    ensure_free_space,
    human_bytes,
    kept_mode,
    read_json,
    remove_stale_temps,
    sha256_file,
    sha256_text,
    write_json,
)
from clipret.artifacts.embeddings import (
    EMBEDDINGS_FORMAT,
    Embeddings,
    array_digest,
    content_hash,
    ids_digest,
    load_embeddings,
    manifest_path,
    save_embeddings,
)
from clipret.artifacts.index import INDEX_FORMAT, read_index_pair, read_sidecar, sidecar_path, write_index_pair
from clipret.artifacts.model import (
    CONFIG_NAME,
    MODEL_FORMAT,
    WEIGHTS_NAME,
    fingerprint_of,
    load_checkpoint,
    load_model_folder,
    load_weights_file,
    read_model_config,
    save_checkpoint,
    save_model_folder,
)
from clipret.artifacts.neighbors import (
    EXACT,
    GalleryGraph,
    NEIGHBORS_FORMAT,
    load_gallery_graph,
    neighbors_path,
    save_gallery_graph,
)
from clipret.artifacts.results import RESULTS_FORMAT, load_results, load_results_meta, results_meta_path, save_results

__all__ = [
    "Embeddings", "array_digest", "content_hash", "ids_digest", "load_results_meta", "results_meta_path", "RESULTS_FORMAT", "save_embeddings", "load_embeddings", "manifest_path", "save_results", "load_results",
    "save_model_folder", "read_model_config", "load_model_folder", "load_weights_file", "fingerprint_of", "save_checkpoint",
    "load_checkpoint", "kept_mode", "atomic_open", "atomic_path", "read_json", "write_json", "remove_stale_temps",
    "sha256_file", "sha256_text", "ensure_free_space", "human_bytes", "EMBEDDINGS_FORMAT", "MODEL_FORMAT", "CONFIG_NAME", "WEIGHTS_NAME",
    "neighbors_path", "save_gallery_graph", "load_gallery_graph", "NEIGHBORS_FORMAT", "EXACT", "GalleryGraph",
    "INDEX_FORMAT", "read_index_pair", "read_sidecar", "sidecar_path", "write_index_pair",
]
