"""Hard-negative miners for `mmemb mine`: a rank window over kNN results, and random."""

from __future__ import annotations

import mmemb
from mmemb.plugins import Registrar
from mmemb_mining.knn import KnnConfig, KnnMiner
from mmemb_mining.random_miner import RandomConfig, RandomMiner


@mmemb.hookimpl
def mmemb_register_miners(registry: Registrar) -> None:
    registry.add(
        "knn",
        KnnMiner,
        config=KnnConfig,
        summary="negatives from a rank window of the model's top-k, false negatives dropped",
    )
    registry.add(
        "random",
        RandomMiner,
        config=RandomConfig,
        summary="uniformly random negatives from the dataset's pool (a baseline)",
    )
