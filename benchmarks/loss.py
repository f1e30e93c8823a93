"""Tiled vs full-matrix contrastive loss: peak memory and time of forward+backward, side by side.

    python benchmarks/loss.py                          # CPU: B=M in {4096, 16384}, D=1024
    python benchmarks/loss.py --device cuda --sizes 16384 65536 262144 --peer   # GPU (+ inf-cl)
    python benchmarks/loss.py --device cuda --dtype bfloat16 --reweighter ega --peer \
        --full-max 65536 --peak-tflops 790           # what benchmarks/gpu/run.sh runs

Every measurement runs in a fresh subprocess after a warm-up on a small problem, and the
implementations are interleaved repeat by repeat (so a busy machine slows them alike).

- Memory: the peak above the inputs, gradients included. On CPU it is the peak resident set
  (reset through /proc/self/clear_refs once the inputs exist) of a process started with
  ``MALLOC_MMAP_THRESHOLD_=65536``, so that every freed buffer leaves the resident set and the peak
  is the peak of live memory; on CUDA ``torch.cuda.max_memory_allocated``.
- Time: the wall time of ``loss.backward()`` including the forward (CUDA: synchronised), the best
  of ``--inner`` runs per process, in processes with the default allocator. The summary prints
  the best and the median over all ``--repeats`` processes, and the ratios of the best times
  (the machine's background load only ever adds time, so the best run is the least disturbed).
- Throughput: the loss costs about ``6·B·M·D`` FLOPs forward + backward (the logits matmul, and
  the two gradient matmuls; the tiled backward's recomputation of the logits is not counted, so
  this is useful work per second); TFLOP/s is that over the best time, and ``--peak-tflops``
  adds the share of the device's peak.

Implementations: ``full`` (``contrastive_loss(...)``, the whole matrix; ``--full-max`` skips it
above a size whose B×M matrix cannot fit), ``tiled``
(``contrastive_loss(..., impl=plugins.build("loss", "tiled", tile_size=T, implementation=I))``:
PyTorch tiles on CPU, the Triton kernel on CUDA; ``--implementation triton`` forces the kernel,
e.g. under ``TRITON_INTERPRET=1`` on a CPU) and, with ``--peer`` on CUDA, the ``inf-cl``
package's ``cal_inf_loss`` (Cheng et al. 2024; ``pip install inf-cl``), which computes plain
InfoNCE whatever ``--reweighter`` says (it upcasts its inputs to float32 inside) — the
reference point a reweighted tiled loss is compared with. Without CUDA or without the package
the peer is skipped with a line that says why.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any

IMPLS = ("full", "tiled", "inf-cl")
FLOPS_PER_ELEMENT = 6  # per (row, column, dim): 2 for the logits, 2 for dq, 2 for dc


def loss_flops(b: int, m: int, d: int) -> float:
    """Useful FLOPs of one forward + backward of the loss: ``6·B·M·D``."""
    return float(FLOPS_PER_ELEMENT) * b * m * d


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(match.group(1)) / 1024 if match else float("nan")


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement (runs in its own process)."""
    import torch

    import mmemb.loss as L
    from mmemb import plugins

    device = spec["device"]
    if device == "cpu":
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    b, m, d = spec["b"], spec["m"], spec["d"]
    dtype = getattr(torch, spec["dtype"])
    q = torch.randn(b, d, device=device, dtype=dtype)
    c = torch.randn(m, d, device=device, dtype=dtype)
    q = torch.nn.functional.normalize(q, dim=-1).requires_grad_()
    c = torch.nn.functional.normalize(c, dim=-1).requires_grad_()
    targets = torch.arange(b, device=device)
    rw = plugins.build("reweighter", spec["reweighter"]) if spec["reweighter"] != "none" else None
    tau = spec["temperature"]
    impl = spec["impl"]

    loss_impl = None
    if impl == "inf-cl":
        from inf_cl import cal_inf_loss  # type: ignore[import-not-found]

        def step() -> None:
            cal_inf_loss(q, c, targets, scale=1.0 / tau).mean().backward()
    else:
        loss_impl = (plugins.build("loss", "tiled", tile_size=spec["tile"],
                                   implementation=spec.get("implementation", "auto"))
                     if impl == "tiled" else None)

        def step() -> None:
            loss = L.contrastive_loss(q, c, targets, temperature=tau, reweighter=rw, impl=loss_impl)
            loss.backward()

    # Warm up on a small problem with the same tile shapes (thread pools, kernel selection,
    # Triton compilation), so the timed runs measure the steady state.
    n_small = int(min(b, m, 2 * spec["tile"]))
    small_q = q[:n_small].detach().clone().requires_grad_()
    small_c = c[:n_small].detach().clone().requires_grad_()
    if impl == "inf-cl":
        cal_inf_loss(small_q, small_c, targets[:n_small], scale=1.0 / tau).mean().backward()
    else:
        L.contrastive_loss(
            small_q, small_c, targets[:n_small], temperature=tau, reweighter=rw, impl=loss_impl,
        ).backward()
    del small_q, small_c
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
        try:
            for _ in range(spec["inner"]):
                q.grad = c.grad = None
                start = time.perf_counter()
                step()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError:
            return {"oom": True}
        peak = (torch.cuda.max_memory_allocated() - base_bytes) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set to the current one
        base = _rss_mib("VmRSS")
        for _ in range(spec["inner"]):
            q.grad = c.grad = None
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        peak = _rss_mib("VmHWM") - base
    seconds = min(times)
    assert q.grad is not None
    backend = "inf-cl" if impl == "inf-cl" else "full"
    if loss_impl is not None:
        backend = loss_impl.backend_for(q, rw or L.PLAIN).name
    return {"seconds": seconds, "peak_mib": peak, "grad_norm": float(q.grad.float().norm()),
            "backend": backend}


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    if spec["mode"] == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed buffers leave the resident set
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine(device: str) -> str:
    cores = os.cpu_count()
    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name()} (CUDA), {cores} CPU cores"
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return f"{model}, {cores} CPU cores, no GPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="B = M values")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--tile", type=int, default=1536, help="tile size of the PyTorch tiles")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--temperature", type=float, default=0.02)
    ap.add_argument("--reweighter", default="none", help="registry name (none, ega, llave, ...)")
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per implementation")
    ap.add_argument("--inner", type=int, default=2, help="timed runs per process (min is kept)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per measurement")
    ap.add_argument("--peer", action="store_true",
                    help="also run inf-cl's cal_inf_loss (CUDA; plain InfoNCE)")
    ap.add_argument("--impls", nargs="+", choices=["full", "tiled"], default=["full", "tiled"],
                    help="mmemb implementations to measure")
    ap.add_argument("--implementation", default="auto", choices=["auto", "torch", "triton"],
                    help="the tiled loss's backend (triton on a CPU needs TRITON_INTERPRET=1)")
    ap.add_argument("--full-max", type=int, default=None,
                    help="skip the full matrix above this B = M (its B×M logits cannot fit)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak for the dtype (H200 bf16 dense: ~790), for a %% column")
    ap.add_argument("--no-memory", action="store_true",
                    help="CPU: skip the separate peak-memory processes (times only)")
    ap.add_argument("--json", help="write all measurements to this file")
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return

    sizes = args.sizes or ([4096, 16384] if args.device == "cpu" else [16384, 65536, 262144])
    impls = list(args.impls)
    notes: list[str] = []
    if args.peer:
        why = _peer_unavailable(args.device)
        if why:
            notes.append(f"inf-cl peer skipped: {why}")
            print(notes[-1], flush=True)
        else:
            impls.append("inf-cl")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"machine: {_machine(args.device)}; D={args.dim}, {args.dtype}, tile={args.tile}, "
          f"reweighter={args.reweighter} (inf-cl: plain), τ={args.temperature}, "
          f"tiled implementation={args.implementation}, "
          f"{args.repeats} processes × {args.inner} runs each", flush=True)
    results: dict[tuple[int, str], list[dict[str, Any]]] = {}
    memory: dict[tuple[int, str], dict[str, Any]] = {}
    skipped: dict[tuple[int, str], str] = {}

    def spec_for(n: int, impl: str, mode: str) -> dict[str, Any]:
        return dict(
            device=args.device, b=n, m=n, d=args.dim, dtype=args.dtype, tile=args.tile,
            temperature=args.temperature, reweighter=args.reweighter, impl=impl,
            implementation=args.implementation,
            threads=args.threads, inner=1 if mode == "memory" else args.inner, mode=mode,
        )

    def shown(res: dict[str, Any], key: str, unit: str) -> str:
        if key in res:
            return f"{res[key]:.3f} {unit}" if unit == "s" else f"{res[key]:.0f} {unit}"
        return "OOM" if res.get("oom") else res.get("error", "?")

    for n in sizes:
        todo = []
        for impl in impls:
            if impl == "full" and args.full_max is not None and n > args.full_max:
                skipped[(n, impl)] = f"skipped: B = M > --full-max {args.full_max}"
                print(f"  B=M={n:>7} {impl:>6} {skipped[(n, impl)]}", flush=True)
            else:
                todo.append(impl)
        if args.device == "cpu" and not args.no_memory:
            for impl in todo:
                memory[(n, impl)] = res = _measure(spec_for(n, impl, "memory"))
                print(f"  B=M={n:>7} {impl:>6} memory: {shown(res, 'peak_mib', 'MiB')}", flush=True)
        for rep in range(args.repeats):
            order = todo if rep % 2 == 0 else todo[::-1]
            for impl in order:
                res = _measure(spec_for(n, impl, "time"))
                results.setdefault((n, impl), []).append(res)
                if args.device == "cuda":
                    memory.setdefault((n, impl), res)
                print(f"  B=M={n:>7} {impl:>6} repeat {rep + 1}: {shown(res, 'seconds', 's')}"
                      f"{' (' + res['backend'] + ')' if 'backend' in res else ''}", flush=True)

    def stat(n: int, impl: str, key: str, how: str = "best") -> float | None:
        if key == "peak_mib":
            return memory.get((n, impl), {}).get(key)
        vals = [r[key] for r in results.get((n, impl), []) if key in r]
        if not vals:
            return None
        return min(vals) if how == "best" else statistics.median(vals)

    def failure(n: int, impl: str) -> str:
        if (n, impl) in skipped:
            return "skipped"
        runs = results.get((n, impl), [])
        if any(r.get("oom") for r in runs):
            return "OOM"
        return "error" if runs else "–"

    peak_col = args.peak_tflops is not None
    print()
    print("| B = M | impl | time, best (s) | time, median (s) | peak memory (MiB) | TFLOP/s "
          + ("| % of peak " if peak_col else "")
          + "| time / full (best) | memory full / this |")
    print("|---|---|---|---|---|---|" + ("---|" if peak_col else "") + "---|---|")
    rows: list[dict[str, Any]] = []
    for n in sizes:
        ft, fm = stat(n, "full", "seconds"), stat(n, "full", "peak_mib")
        for impl in impls:
            t, med, m = (stat(n, impl, "seconds"), stat(n, impl, "seconds", "median"),
                         stat(n, impl, "peak_mib"))
            tflops = loss_flops(n, n, args.dim) / t / 1e12 if t else None
            label = "inf-cl (plain)" if impl == "inf-cl" and args.reweighter != "none" else impl
            cells = [
                f"{t:.3f}" if t is not None else failure(n, impl),
                f"{med:.3f}" if med is not None else "–",
                f"{m:.0f}" if m is not None else "–",
                f"{tflops:.1f}" if tflops is not None else "–",
            ]
            if peak_col:
                cells.append(f"{100 * tflops / args.peak_tflops:.0f} %" if tflops else "–")
            cells += [f"{t / ft:.2f}×" if t is not None and ft else "–",
                      f"{fm / m:.1f}×" if m and fm else "–"]
            print(f"| {n} | {label} | " + " | ".join(cells) + " |")
            rows.append({"n": n, "impl": impl, "label": label, "best_s": t, "median_s": med,
                         "peak_mib": m, "tflops": tflops, "status": failure(n, impl)
                         if t is None else "ok",
                         "backend": next((r["backend"] for r in results.get((n, impl), [])
                                          if "backend" in r), None),
                         "grad_norm": stat(n, impl, "grad_norm")})
    for note in notes:
        print(note)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"rows": rows, "notes": notes, "machine": _machine(args.device),
                 "args": vars(args), "load_average": os.getloadavg(),
                 "runs": {f"{n}:{impl}": {"time": v, "memory": memory.get((n, impl))}
                          for (n, impl), v in results.items()}},
                f, indent=2,
            )


def _peer_unavailable(device: str) -> str | None:
    """Why inf-cl cannot run here, or None."""
    if device != "cuda":
        return "inf-cl's kernels need CUDA tensors (it asserts q.is_cuda)"
    try:
        import inf_cl  # type: ignore[import-not-found]  # noqa: F401
    except Exception as exc:  # an import error inside the package counts too
        return f"the inf-cl package cannot be imported ({type(exc).__name__}: {exc})"
    return None


if __name__ == "__main__":
    main()
