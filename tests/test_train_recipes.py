"""The shipped large-scale recipes run end to end on a CPU with a tiny stand-in backbone:
`mmemb validate RECIPE model.backbone.path=<tiny dir>` builds everything (DeepSpeed, bf16, LoRA,
GradCache) and runs one training step. MMEB-train is not here, so the data is swapped for a few
synthetic samples; the batch is shrunk to keep it quick."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from mmemb_hf.tiny import make_tiny_llava_onevision, make_tiny_qwen2_vl

from mmemb.cli import cli
from mmemb.train.testing import prepare_synthetic

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
MAKERS: dict[str, Any] = {"llava_ov_7b": make_tiny_llava_onevision,
                          "qwen2_vl_2b": make_tiny_qwen2_vl}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_large_recipe_validates_with_a_tiny_backbone(tmp_path: Path, name: str) -> None:
    tiny = tmp_path / "tiny"
    MAKERS[name](tiny, weights=True, seed=0)
    data = prepare_synthetic(tmp_path / "data", n=16, negatives=1)
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(cli, [
            "validate", str(ROOT / "recipes" / f"{name}.yaml"), f"model.backbone.path={tiny}",
            f"data.train=[{{shards: {data}}}]", "train.batch_size=4", "train.negatives=1",
            "train.grad_cache.query_chunk=2", "train.grad_cache.candidate_chunk=3",
        ], catch_exceptions=False)
    finally:
        os.chdir(old)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "engine=deepspeed" in out and "precision=bf16" in out
    assert "grad_cache: query_chunk=2 candidate_chunk=3" in out
    assert "one training step ran: loss" in out and "The recipe is valid." in out
