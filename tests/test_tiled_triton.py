"""The Triton kernel of the tiled loss against the PyTorch tiles, for every reweighter.

- Interpreter (every CI run, needs ``triton`` installed): ``TRITON_INTERPRET=1`` runs the kernels
  on CPU tensors through Triton's interpreter. It must be set before triton is imported, so the
  comparison runs in a subprocess: this file executed as a script. Shapes are tiny and not
  multiples of the blocks. The interpreter's ``tl.dot`` is wrong for bfloat16 inputs (triton
  3.9), so it checks float32 and float16; bfloat16 is checked by the ``gpu`` tests.
- ``gpu``: the compiled kernel on CUDA equals the PyTorch tiles (fp32 tight, bf16 loose).
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


def compare(name, options, *, b, m, d, dtype, device, blocks=None, seed=0):
    """Max errors of the Triton engine against the PyTorch tiles (loss, dq, dc, dτ)."""
    import torch
    import torch.nn.functional as F
    from mmemb_tiled.function import TiledCE, TorchTiles, TritonTiles

    from mmemb import plugins

    g = torch.Generator().manual_seed(seed)
    q0 = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(device=device, dtype=dtype)
    c0 = F.normalize(torch.randn(m, d, generator=g), dim=-1).to(device=device, dtype=dtype)
    t = torch.randint(0, m, (b,), generator=g).to(device)
    rw = plugins.build("reweighter", name, **options)
    out = []
    for backend in (TorchTiles(), TritonTiles(blocks)):
        q, c = q0.clone().requires_grad_(), c0.clone().requires_grad_()
        tau = torch.tensor(0.05, device=device, requires_grad=True)
        loss = TiledCE.apply(q, c, t, tau, rw, 16, backend, None)
        loss.backward()
        out.append([loss.detach(), q.grad.float(), c.grad.float(), tau.grad])
    errors = {}
    for key, ref, got in zip(("loss", "dq", "dc", "dtau"), *out, strict=True):
        scale = max(float(ref.abs().max()), 1.0)
        errors[key] = float((got.float() - ref.float()).abs().max()) / scale
    return errors


# ------------------------------------------------------------------------------- interpreter

INTERPRETER_CASES = [  # (reweighter index, B, M, D, dtype): 2 × 3 blocks of 16, 2 chunks of D
    *[(i, 17, 33, 20, "float32") for i in range(len(REWEIGHTERS))],
    (5, 1, 17, 24, "float32"),
    (2, 17, 33, 20, "float16"),
]


def _interpreter_main() -> None:
    """Run every interpreter case (this process has TRITON_INTERPRET=1); print JSON."""
    import torch
    from mmemb_tiled.triton_kernel import Blocks

    results = []
    for i, b, m, d, dtype in INTERPRETER_CASES:
        name, options = REWEIGHTERS[i]
        errors = compare(name, options, b=b, m=m, d=d, dtype=getattr(torch, dtype), device="cpu",
                         blocks=Blocks(16, 16, 16, 1, 1), seed=i)
        results.append({"case": [name, options, b, m, d, dtype], "errors": errors})
    print(json.dumps(results))


@needs_triton
def test_triton_kernel_logic_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(INTERPRETER_CASES)
    for r in results:
        tol = 1e-5 if r["case"][-1] == "float32" else 2e-2
        for key, err in r["errors"].items():
            assert err <= tol, (r["case"], key, err)


# -------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize(("name", "options"), REWEIGHTERS, ids=[n for n, _ in REWEIGHTERS])
@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_compiled_kernel_equals_the_torch_tiles(name, options, dtype, tol):
    import torch

    for b, m, d in ((300, 900, 200), (7, 130, 64), (1, 5, 1024)):
        errors = compare(name, options, b=b, m=m, d=d, dtype=getattr(torch, dtype),
                         device="cuda", seed=b)
        assert all(e <= tol for e in errors.values()), (b, m, d, errors)


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
