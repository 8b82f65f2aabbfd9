"""clipret: train and serve CLIP-based image retrieval.

The public Python API is small and imports nothing heavy at import time:
torch and open_clip are loaded only by the functions that need them.
"""

__version__ = "0.1.0"

from clipret.errors import ClipretError

__all__ = ["ClipretError", "__version__"]
