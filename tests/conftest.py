"""Shared test set-up: no network, CPU-friendly threads, marker handling."""

from __future__ import annotations

import os

# Set before transformers/huggingface_hub are imported anywhere: a hub id must fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator  # noqa: E402

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


@pytest.fixture(scope="module")
def hf_plugins_only() -> Iterator[None]:
    """Only the mmemb_hf plugin registered: a backbone test must not depend on other plugins
    importing cleanly. Use with ``pytestmark = pytest.mark.usefixtures("hf_plugins_only")``."""
    import mmemb_hf

    from mmemb.testing import only_plugins

    with only_plugins(mmemb_hf):
        yield
