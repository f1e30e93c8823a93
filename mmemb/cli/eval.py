"""`mmemb eval --model DIR --data SHARDS... [--task mmeb|retrieval] --out results/`, and
`mmemb eval --compare a/results.json b/results.json`."""

from __future__ import annotations

from pathlib import Path

import click

from mmemb.cli.options import model_options, model_source, parse_key_values


@click.command("eval")
@model_options(required=False)
@click.option("--data", "data", multiple=True, type=click.Path(),
              help="A prepared eval shard directory (mmemb prepare --source mmeb_eval); repeat it, "
                   "or list several after it (shell globs work).")
@click.argument("more_data", nargs=-1, type=click.Path(), metavar="[SHARDS]...")
@click.option("--task", default="mmeb", show_default=True,
              help="Eval task: mmeb (P@1 over each query's candidates) or retrieval (Recall@k, "
                   "MRR@10, NDCG@10 over a shared corpus); `mmemb plugins list` shows all.")
@click.option("--arg", "--task-arg", "task_args", multiple=True, metavar="KEY=VALUE",
              help="A task setting, e.g. ties=miss (mmeb) or recall_at=[1,5,10] (retrieval); "
                   "values are YAML. (--task-arg is the old name.)")
@click.option("--out", default="results", show_default=True, type=click.Path(file_okay=False),
              help="Directory for results.json and results.md.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Embedding cache (default: OUT/cache). Re-running skips cached datasets.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the embedding cache.")
@click.option("--references", type=click.Path(dir_okay=False), default=None,
              help="JSON of published scores to show beside ours (see docs/eval.md).")
@click.option("--datasets", "datasets", multiple=True, metavar="NAME",
              help="Evaluate only these datasets (repeat, or comma-separate).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if "
                                                 "available, else cpu).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              show_default=True, help="auto: bf16 on CUDA, fp32 on CPU.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars (default: when stderr is a terminal).")
@click.option("--compare", "compare_paths", nargs=2, type=click.Path(), default=None,
              metavar="A B", help="Print the per-dataset differences between two results.json "
                                  "files (B minus A) and exit.")
def command(
    model: str | None, backbone: str | None, pooler: str | None, model_args: tuple[str, ...],
    data: tuple[str, ...], more_data: tuple[str, ...], task: str,
    task_args: tuple[str, ...], out: str, batch_size: int, cache_dir: str | None, no_cache: bool,
    references: str | None, datasets: tuple[str, ...], device: str | None, precision: str,
    progress: bool | None, compare_paths: tuple[str, str] | None,
) -> None:
    """Evaluate an embedding model on eval shards, or compare two evaluations.

    Writes OUT/results.json (per dataset, per group, overall, fingerprints, versions, exact
    candidate counts) and OUT/results.md (the MMEB leaderboard-style table). Embeddings are cached
    under OUT/cache keyed by model and data, so an interrupted run resumes where it stopped.
    Launch with torchrun to shard encoding over processes/GPUs.

    \b
    Examples:
      mmemb prepare --source mmeb_eval --input 'MMEB-eval/*/test-*.parquet' \\
          --image-root MMEB-eval/eval_images --out data/mmeb_eval
      mmemb eval --model runs/llava_ov_7b/model --data data/mmeb_eval --out results/ova7b
      torchrun --nproc-per-node 8 -m mmemb eval --model runs/llava_ov_7b --data data/mmeb_eval
      mmemb eval --model runs/quickstart/model --data data/quickstart/eval --task retrieval \\
          --out results/r
      mmemb eval --compare runs/quickstart/eval_before/results.json \\
          runs/quickstart/eval_after/results.json
    """
    if compare_paths is not None:
        if model or backbone or pooler or model_args or data or more_data:
            raise click.UsageError("--compare takes two results.json files and nothing else")
        from mmemb.eval.report import compare
        from mmemb.eval.results import EvalResults

        a_path, b_path = compare_paths
        a, b = EvalResults.load(a_path), EvalResults.load(b_path)
        click.echo(compare(a, b, labels=(a_path, b_path)), nl=False)
        return
    if not model:
        raise click.UsageError("--model is required (or use --compare A B)")
    shard_dirs = [*data, *more_data]
    if not shard_dirs:
        raise click.UsageError("--data is required: one or more prepared eval shard directories")
    if more_data and not data:
        raise click.UsageError(f"unexpected argument(s) {' '.join(more_data)}; pass shard "
                               "directories after --data")
    names = [n.strip() for entry in datasets for n in entry.split(",") if n.strip()] or None

    from mmemb.eval.runner import evaluate_path

    cache = None if no_cache else Path(cache_dir) if cache_dir else Path(out) / "cache"
    results = evaluate_path(
        model_source(model, backbone, pooler, model_args), shard_dirs, task=task,
        task_args=parse_key_values(task_args, flag="--arg"), out=out,
        batch_size=batch_size, cache_dir=cache, references=references, show_progress=progress,
        datasets=names, device=device, precision=precision,  # type: ignore[arg-type]
    )
    from mmemb.distributed import dist_env

    if dist_env().rank == 0:
        click.echo(results.to_markdown())
        click.echo(f"wrote {Path(out) / 'results.json'} and {Path(out) / 'results.md'}")
