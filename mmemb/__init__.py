"""mmemb: train universal multimodal embedding models with hard-negative gradient amplification."""

from mmemb.errors import MmembError
from mmemb.hookspecs import MMEMB_PLUGIN_API, hookimpl

__version__ = "0.1.0"

__all__ = ["MMEMB_PLUGIN_API", "MmembError", "__version__", "hookimpl"]
