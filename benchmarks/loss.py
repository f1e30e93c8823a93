"""Tiled vs full-matrix contrastive loss: peak memory and time of forward+backward, side by side.

    python benchmarks/loss.py                          # CPU: B=M in {4096, 16384}, D=1024
    python benchmarks/loss.py --device cuda --sizes 16384 65536 262144 --peer   # GPU (+ inf-cl)

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

Implementations: ``full`` (``contrastive_loss(...)``, the whole matrix), ``tiled``
(``contrastive_loss(..., impl=plugins.build("loss", "tiled", tile_size=T))``: PyTorch tiles on
CPU, the Triton kernel on CUDA) and, with
``--peer`` on CUDA for the plain-InfoNCE case, the ``inf-cl`` package's ``cal_inf_loss``
(Cheng et al. 2024), which must be installed separately (``pip install inf-cl``).
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

    if impl == "inf-cl":
        from inf_cl import cal_inf_loss  # type: ignore[import-not-found]

        def step() -> None:
            cal_inf_loss(q, c, targets, scale=1.0 / tau).mean().backward()
    else:
        loss_impl = (plugins.build("loss", "tiled", tile_size=spec["tile"]) if impl == "tiled"
                     else None)

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
    return {"seconds": seconds, "peak_mib": peak, "grad_norm": float(q.grad.norm())}


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
    ap.add_argument("--peer", action="store_true", help="also run inf-cl's cal_inf_loss (CUDA)")
    ap.add_argument("--json", help="write all measurements to this file")
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return

    sizes = args.sizes or ([4096, 16384] if args.device == "cpu" else [16384, 65536, 262144])
    impls = ["full", "tiled"]
    if args.peer:
        if args.device != "cuda" or args.reweighter != "none":
            ap.error("--peer (inf-cl) runs on CUDA for the plain-InfoNCE case (--reweighter none)")
        impls.append("inf-cl")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"machine: {_machine(args.device)}; D={args.dim}, {args.dtype}, tile={args.tile}, "
          f"reweighter={args.reweighter}, τ={args.temperature}, "
          f"{args.repeats} processes × {args.inner} runs each")
    results: dict[tuple[int, str], list[dict[str, Any]]] = {}
    memory: dict[tuple[int, str], dict[str, Any]] = {}

    def spec_for(n: int, impl: str, mode: str) -> dict[str, Any]:
        return dict(
            device=args.device, b=n, m=n, d=args.dim, dtype=args.dtype, tile=args.tile,
            temperature=args.temperature, reweighter=args.reweighter, impl=impl,
            threads=args.threads, inner=1 if mode == "memory" else args.inner, mode=mode,
        )

    def shown(res: dict[str, Any], key: str, unit: str) -> str:
        if key in res:
            return f"{res[key]:.2f} {unit}" if unit == "s" else f"{res[key]:.0f} {unit}"
        return "OOM" if res.get("oom") else res.get("error", "?")

    for n in sizes:
        if args.device == "cpu":
            for impl in impls:
                memory[(n, impl)] = res = _measure(spec_for(n, impl, "memory"))
                print(f"  B=M={n:>7} {impl:>6} memory: {shown(res, 'peak_mib', 'MiB')}", flush=True)
        for rep in range(args.repeats):
            order = impls if rep % 2 == 0 else impls[::-1]
            for impl in order:
                res = _measure(spec_for(n, impl, "time"))
                results.setdefault((n, impl), []).append(res)
                if args.device == "cuda":
                    memory.setdefault((n, impl), res)
                print(f"  B=M={n:>7} {impl:>6} repeat {rep + 1}: {shown(res, 'seconds', 's')}",
                      flush=True)

    def stat(n: int, impl: str, key: str, how: str = "best") -> float | None:
        if key == "peak_mib":
            return memory.get((n, impl), {}).get(key)
        vals = [r[key] for r in results.get((n, impl), []) if key in r]
        if not vals:
            return None
        return min(vals) if how == "best" else statistics.median(vals)

    print()
    print("| B = M | impl | time, best (s) | time, median (s) | peak memory (MiB) "
          "| time / full (best) | memory full / this |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        ft, fm = stat(n, "full", "seconds"), stat(n, "full", "peak_mib")
        for impl in impls:
            t, med, m = (stat(n, impl, "seconds"), stat(n, impl, "seconds", "median"),
                         stat(n, impl, "peak_mib"))
            ts = f"{t:.2f}" if t is not None else "–"
            meds = f"{med:.2f}" if med is not None else "–"
            ms = f"{m:.0f}" if m is not None else "–"
            tr = f"{t / ft:.2f}×" if t is not None and ft else "–"
            mr = f"{fm / m:.1f}×" if m and fm else "–"
            print(f"| {n} | {impl} | {ts} | {meds} | {ms} | {tr} | {mr} |")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {f"{n}:{impl}": {"time": v, "memory": memory.get((n, impl))}
                 for (n, impl), v in results.items()}
                | {"machine": _machine(args.device), "args": vars(args),
                   "load_average": os.getloadavg()},
                f, indent=2,
            )


if __name__ == "__main__":
    main()
