"""Shared test set-up: no network, CPU-friendly threads, marker handling.

Plugin isolation comes from mmemb's pytest plugin (`mmemb.testing.pytest_plugin`): mark a
module ``pytestmark = pytest.mark.only_plugins("mmemb_hf")``, a test
``@pytest.mark.only_plugins()``, or use the ``only_plugins`` fixture as a context manager.
"""

from __future__ import annotations

import os

# Set before transformers/huggingface_hub are imported anywhere: a hub id must fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
