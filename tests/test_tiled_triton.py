"""The Triton kernel of the tiled loss against the PyTorch tiles, for every reweighter.

- Interpreter (every CI run, needs ``triton`` installed): ``TRITON_INTERPRET=1`` runs the kernels
  on CPU tensors through Triton's interpreter. It must be set before triton is imported, so the
  comparison runs in a subprocess: this file executed as a script. Shapes are tiny and not
  multiples of the blocks. The interpreter's ``tl.dot`` is wrong for bfloat16 inputs (triton
  3.9), so it checks float32 and float16; bfloat16 is checked by the ``gpu`` tests.
- ``gpu``: the compiled kernel on CUDA equals the PyTorch tiles (fp32 tight, bf16 loose).

Cases with ``dup`` draw candidate content keys from a few values, so many columns copy some
row's positive: the kernel must mask them exactly as the PyTorch tiles do.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from loss_impls import impl

REWEIGHTERS = [
    ("none", {}),
    ("ega", {}),
    ("ega", {"alpha": 2.0, "hardness": "linear", "margin": 0.3, "normalize": True,
             "fn_margin": 0.05}),
    ("ega", {"tau_h": 0.1, "normalize": True}),
    ("llave", {"alpha": 9.0}),
    ("topk_mask", {"k": 3, "delta": 0.05}),
    ("topk_mask", {"k": 1, "delta": 0.0}),
]

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (CI installs triton==3.9.0 for the kernel step)",
)


def duplicate_keys(m, t, *, distinct, generator):
    """Content keys (M,) drawn from ``distinct`` values (many copies of positives), and how many
    (row, column) entries they mask."""
    import torch

    from mmemb.loss import DuplicateKeys, count_duplicates

    keys = torch.randint(0, distinct, (m,), generator=generator).to(t.device)
    dk = DuplicateKeys.for_candidates(keys, t)
    return dk, count_duplicates(dk)


def compare(name, options, *, b, m, d, dtype, device, blocks=None, seed=0, dup=False):
    """Max errors of the Triton engine against the PyTorch tiles (loss, dq, dc, dτ); with
    ``dup``, also how many entries the duplicate keys masked (``masked``)."""
    import torch
    import torch.nn.functional as F
    from mmemb_tiled.autograd import TiledCE, TorchTiles, TritonTiles

    from mmemb import plugins

    g = torch.Generator().manual_seed(seed)
    q0 = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(device=device, dtype=dtype)
    c0 = F.normalize(torch.randn(m, d, generator=g), dim=-1).to(device=device, dtype=dtype)
    t = torch.randint(0, m, (b,), generator=g).to(device)
    keys, masked = (None, 0)
    if dup:
        keys, masked = duplicate_keys(m, t, distinct=max(2, m // 6), generator=g)
    rw = plugins.build("reweighter", name, **options)
    out = []
    for backend in (TorchTiles(), TritonTiles(blocks)):
        q, c = q0.clone().requires_grad_(), c0.clone().requires_grad_()
        tau = torch.tensor(0.05, device=device, requires_grad=True)
        loss = TiledCE.apply(q, c, t, tau, rw, 16, backend, keys)
        loss.backward()
        out.append([loss.detach(), q.grad.float(), c.grad.float(), tau.grad])
    errors = {}
    for key, ref, got in zip(("loss", "dq", "dc", "dtau"), *out, strict=True):
        scale = max(float(ref.abs().max()), 1.0)
        errors[key] = float((got.float() - ref.float()).abs().max()) / scale
    if dup:
        errors["masked"] = masked
    return errors


def forced_triton_with_keys(*, device, blocks=None):
    """``implementation=triton`` through the public loss with duplicate keys and the symmetric
    term, against ``implementation=torch``: max relative errors of (loss, dq, dc)."""
    import torch
    import torch.nn.functional as F

    import mmemb.loss as L
    from mmemb import plugins

    g = torch.Generator().manual_seed(7)
    b, k, d = 10, 2, 24
    q0 = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(device)
    c0 = F.normalize(torch.randn(b + b * k, d, generator=g), dim=-1).to(device)
    t = torch.arange(b, device=device)
    keys = torch.randint(0, 4, (b + b * k,), generator=g).to(device)
    ega = plugins.build("reweighter", "ega", alpha=2.0, normalize=True)
    out = []
    for implementation in ("torch", "triton"):
        tiled = plugins.build("loss", "tiled", tile_size=8, implementation=implementation)
        if implementation == "triton":
            assert tiled.backend_for(q0, ega).name == "triton"
            if blocks is not None:
                tiled._triton_backend().blocks = blocks
        q, c = q0.clone().requires_grad_(), c0.clone().requires_grad_()
        loss = L.contrastive_loss(q, c, t, temperature=0.05, reweighter=ega, keys=keys,
                                  impl=tiled, symmetric=True)
        loss.backward()
        out.append([loss.detach(), q.grad, c.grad])
    return {key: float((got - ref).abs().max()) / max(float(ref.abs().max()), 1.0)
            for key, ref, got in zip(("loss", "dq", "dc"), *out, strict=True)}


# ------------------------------------------------------------------------------- interpreter

INTERPRETER_CASES = [  # (reweighter index, B, M, D, dtype, dup): 2 × 3 blocks of 16, 2 chunks of D
    *[(i, 17, 33, 20, "float32", False) for i in range(len(REWEIGHTERS))],
    (5, 1, 17, 24, "float32", False),
    (2, 17, 33, 20, "float16", False),
    # duplicate positives masked in the kernel (fp32: the interpreter's bf16 tl.dot is wrong)
    *[(i, 17, 33, 20, "float32", True) for i in (0, 2, 4, 5)],
]


def _interpreter_main() -> None:
    """Run every interpreter case (this process has TRITON_INTERPRET=1); print JSON."""
    import torch
    from mmemb_tiled.triton_kernel import Blocks

    results = []
    for i, b, m, d, dtype, dup in INTERPRETER_CASES:
        name, options = REWEIGHTERS[i]
        errors = compare(name, options, b=b, m=m, d=d, dtype=getattr(torch, dtype), device="cpu",
                         blocks=Blocks(16, 16, 16, 1, 1), seed=i, dup=dup)
        results.append({"case": [name, options, b, m, d, dtype, dup], "errors": errors})
    errors = forced_triton_with_keys(device="cpu", blocks=Blocks(16, 16, 16, 1, 1))
    results.append({"case": ["forced triton, keys, symmetric", {}, 10, 30, 24, "float32", True],
                    "errors": errors})
    print(json.dumps(results))


@needs_triton
def test_triton_kernel_logic_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(INTERPRETER_CASES) + 1
    for r in results:
        errors = dict(r["errors"])
        if r["case"][-1]:  # the keys did mask something, else the case proves nothing
            assert errors.pop("masked", 1) > 0, r["case"]
        tol = 1e-5 if r["case"][-2] == "float32" else 2e-2
        for key, err in errors.items():
            assert err <= tol, (r["case"], key, err)


# -------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize(("name", "options"), REWEIGHTERS, ids=[n for n, _ in REWEIGHTERS])
@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_compiled_kernel_equals_the_torch_tiles(name, options, dtype, tol):
    import torch

    for b, m, d in ((300, 900, 200), (7, 130, 64), (1, 5, 1024)):
        for dup in (False, True):
            errors = compare(name, options, b=b, m=m, d=d, dtype=getattr(torch, dtype),
                             device="cuda", seed=b, dup=dup)
            masked = errors.pop("masked", None)
            assert masked is None or masked > 0 or b == 1, (b, m, d, "no duplicate masked")
            assert all(e <= tol for e in errors.values()), (b, m, d, dup, errors)


@pytest.mark.gpu
@needs_triton
def test_compiled_kernel_forced_with_keys_and_symmetric():
    errors = forced_triton_with_keys(device="cuda")
    assert all(e <= 1e-5 for e in errors.values()), errors


@pytest.mark.gpu
@needs_triton
def test_cuda_tensors_use_the_kernel_and_match_float64():
    import torch
    import torch.nn.functional as F

    import mmemb.loss as L
    from mmemb import plugins

    tiled = plugins.build("loss", "tiled")
    ega = plugins.build("reweighter", "ega", normalize=True)
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(256, 128, generator=g, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(768, 128, generator=g, dtype=torch.float64), dim=-1)
    t = torch.arange(256)
    assert tiled.backend_for(q.float().cuda(), ega).name == "triton"
    grads = []
    for qq, cc, tt in ((q, c, t), (q.float().cuda(), c.float().cuda(), t.cuda())):
        qq, cc = qq.clone().requires_grad_(), cc.clone().requires_grad_()
        tile = None if qq.device.type == "cpu" else 64
        L.contrastive_loss(qq, cc, tt, temperature=0.02, reweighter=ega, impl=impl(tile),
                           symmetric=True).backward()
        grads.append((qq.grad.double().cpu(), cc.grad.double().cpu()))
    for ref, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


if __name__ == "__main__":
    _interpreter_main()
