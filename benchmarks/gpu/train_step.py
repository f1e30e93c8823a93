"""A bf16 LoRA training step of a random-initialised LLaVA-OneVision-architecture model.

    python benchmarks/gpu/train_step.py --size 0.5b --engine torch --jsonl OUT/train.jsonl
    python benchmarks/gpu/train_step.py --size 0.5b --engine zero2 --jsonl OUT/train.jsonl
    python benchmarks/gpu/train_step.py --size tiny --device cpu --steps 1 --warmup 1  # dry run

The model directory is written locally (nothing is downloaded): the tiny LLaVA-OneVision of
``mmemb_hf.tiny`` with its config widened to the size asked for and no weights, so the
backbone is built with ``init: random`` (seeded). ``0.5b`` is Qwen2-0.5B's language model
(24 layers, hidden 896, 14 heads, 2 KV heads, MLP 4864, vocabulary 151 936: 494 M parameters)
with a SigLIP-base-sized vision tower (12 layers, hidden 768, 384 px, 16 px patches: ~86 M), about
0.6 B parameters in all; the released "LLaVA-OneVision-0.5B" pairs the same language model with
the 400 M SigLIP-so400m tower.

The step is mmemb's own (``compute_step`` + ``engine.step()``): the recipe's model (LoRA r=16 on
the language tower, bf16 weights, bf16 autocast), the tiled loss with EGA (the Triton kernel on
CUDA, duplicate-positive keys from the collator), synthetic image/text samples with one hard
negative each, on the ``torch`` engine or DeepSpeed ZeRO-2 (``zero2``; one process, a group of
one). It reports samples/s (queries per second, median of ``--steps`` timed steps after
``--warmup``) and the peak memory (CUDA: ``max_memory_allocated`` over the timed steps; CPU: peak
RSS), printed and appended as one JSON line to ``--jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# Qwen2-0.5B's language model and a SigLIP-base-sized vision tower.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "0.5b": {
        "text": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                 "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                 "max_position_embeddings": 32768, "tie_word_embeddings": True},
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12},
        "image": {"image_size": 384, "patch_size": 16},
    },
    "tiny": {"text": {}, "vision": {}, "image": {"image_size": 32, "patch_size": 8}},
}


def make_model_dir(out: Path, size: str) -> Path:
    """A LLaVA-OneVision model directory (config, tokenizer, image processor; no weights)."""
    from mmemb_hf.tiny import make_tiny_llava_onevision

    spec = SIZES[size]
    make_tiny_llava_onevision(out, weights=False, **spec["image"])
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["text_config"].update(spec["text"])
    cfg["vision_config"].update(spec["vision"])
    if spec["text"].get("layer_types") is None and "num_hidden_layers" in spec["text"]:
        cfg["text_config"]["layer_types"] = ["full_attention"] * spec["text"]["num_hidden_layers"]
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def setup(args: argparse.Namespace, model_dir: Path, work: Path) -> dict[str, Any]:
    """Recipe, encoder, one collated batch, engine and loss: what one training step needs."""
    from mmemb import plugins
    from mmemb.data.collate import Collator
    from mmemb.distributed import DistEnv
    from mmemb.loss import build_loss
    from mmemb.train.engines.base import EngineSetup
    from mmemb.train.setup import build_model, seed_everything
    from mmemb.train.testing import tiny_recipe

    train: dict[str, Any] = {"batch_size": args.batch, "negatives": args.negatives,
                             "steps": 10_000, "warmup_steps": 10, "lr": 1e-5,
                             "precision": args.precision}
    overrides = [
        "loss.name=tiled",
        "model.lora={r: 16, alpha: 32, towers: [language]}",
        f"model.backbone.dtype={'bfloat16' if args.precision == 'bf16' else 'float32'}",
    ]
    if args.engine == "zero2":
        train["engine"] = "deepspeed"
        train["deepspeed"] = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}
    loaded = tiny_recipe(model_dir, work / "unused-data", work / "run", check=False,
                         overrides=overrides, **train)
    seed_everything(0)
    device = torch.device(args.device)
    encoder = build_model(loaded).to(device)
    src = plugins.build("source", "synthetic", n=args.batch, seed=1, negatives=args.negatives)
    batch = Collator(encoder.processor, num_negatives=args.negatives)(
        [src.sample(i) for i in range(args.batch)]).to(device)
    es = EngineSetup(loaded, encoder, DistEnv(0, 1, 0), device)
    if args.engine == "zero2":
        from mmemb.train.engines.deepspeed_engine import DeepSpeedEngine

        engine: Any = DeepSpeedEngine(es)
    else:
        from mmemb.train.engines.torch_engine import TorchEngine

        engine = TorchEngine(es)
    loss = build_loss(loaded.recipe.loss.spec())
    params = sum(p.numel() for p in encoder.parameters())
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    return {"loaded": loaded, "batch": batch, "engine": engine, "loss": loss,
            "params": params, "trainable": trainable}


def step(s: dict[str, Any]) -> float:
    """One training step; returns the loss."""
    from mmemb.train.step import compute_step

    out = compute_step(s["engine"], s["batch"], s["loss"], s["loaded"].recipe.train,
                       check_loss=lambda loss: None)
    s["engine"].step()
    return float(out.loss)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mmemb-gpu-train-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        model_dir = make_model_dir(work / "model", args.size)
        s = setup(args, model_dir, work)
        setup_s = time.perf_counter() - t0
        losses = [step(s) for _ in range(args.warmup)]
        _sync(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            _sync(args.device)
            t = time.perf_counter()
            losses.append(step(s))
            _sync(args.device)
            times.append(time.perf_counter() - t)
        if args.device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated() / 2**20
            device_name = torch.cuda.get_device_name()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            device_name = "cpu"
        s["engine"].close()
        median = statistics.median(times)
        batch = s["batch"]
        return {
            "size": args.size, "engine": args.engine, "device": device_name,
            "precision": args.precision, "batch": args.batch, "negatives": args.negatives,
            "params": s["params"], "trainable": s["trainable"],
            "query_tokens": int(batch.query["input_ids"].numel())
            if "input_ids" in batch.query else None,
            "median_step_s": median, "samples_per_s": args.batch / median,
            "peak_mib": peak, "setup_s": setup_s, "losses": losses,
            "loss_backend": _loss_backend(s),
        }


def _loss_backend(s: dict[str, Any]) -> str:
    """Which implementation the loss ran on (``triton`` is the fused kernel)."""
    impl = s["loss"].impl
    if not hasattr(impl, "backend_for"):
        return str(getattr(impl, "name", "?"))
    q = torch.empty(1, 1, device=s["engine"].device, dtype=torch.float32)
    return str(impl.backend_for(q, s["loss"].reweighter).name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    p.add_argument("--engine", choices=["torch", "zero2"], default="torch")
    p.add_argument("--batch", type=int, default=16, help="queries per step")
    p.add_argument("--negatives", type=int, default=1, help="hard negatives per query")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--jsonl", type=Path, default=None, help="append the result as one JSON line")
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    res = measure(args)
    print(f"{res['size']} LLaVA-OneVision ({res['params'] / 1e6:.1f} M parameters, "
          f"{res['trainable'] / 1e6:.2f} M trainable), engine {res['engine']}, "
          f"{res['precision']}, {res['batch']} queries × (1 + {res['negatives']}) candidates, "
          f"loss on {res['loss_backend']}: {res['samples_per_s']:.1f} samples/s "
          f"({res['median_step_s']:.3f} s/step), peak {res['peak_mib']:.0f} MiB; "
          f"losses {', '.join(f'{x:.3f}' for x in res['losses'])}")
    if args.jsonl is not None:
        with args.jsonl.open("a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
