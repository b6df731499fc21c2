"""Inputs for selective-scan tests, shared by the CPU and CUDA test modules."""

import math

import torch

OPTIONS = {
    "plain": {},
    "D_z": {"D": True, "z": True},
    "all": {"D": True, "z": True, "delta_bias": True, "delta_softplus": True},
}


def make_inputs(L, option, regime, dtype=torch.float64, batch=2, E=20, N=8, device="cpu", seed=0):
    """Random scan inputs in float64 (cast later). ``regime``: "init" (Δ as at Mamba's init, 1e-3..1e-1)
    or "strong" (Δ up to 5, strong decay)."""
    g = torch.Generator().manual_seed(seed)
    opts = OPTIONS[option]

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def uni(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    u = rnd(batch, E, L)
    lo, hi = (1e-3, 1e-1) if regime == "init" else (1e-3, 5.0)
    target = torch.exp(uni(batch, E, L) * (math.log(hi) - math.log(lo)) + math.log(lo))  # desired Δ
    kw = {}
    if opts.get("delta_softplus"):
        bias = torch.log(torch.expm1(target.mean(dim=(0, 2))))  # inverse softplus of the mean Δ
        delta = torch.log(torch.expm1(target)) - bias[:, None]
        kw["delta_bias"], kw["delta_softplus"] = bias, True
    else:
        delta = target
    A = -torch.exp(torch.log(torch.arange(1, N + 1, dtype=torch.float64)).repeat(E, 1) + 0.1 * rnd(E, N))
    B, C = rnd(batch, N, L), rnd(batch, N, L)
    if opts.get("D"):
        kw["D"] = 1.0 + 0.1 * rnd(E)
    if opts.get("z"):
        kw["z"] = rnd(batch, E, L)
    tensors = {
        "u": u,
        "delta": delta,
        "A": A,
        "B": B,
        "C": C,
        **{k: v for k, v in kw.items() if k != "delta_softplus"},
    }
    tensors = {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in tensors.items()}
    return tensors, bool(kw.get("delta_softplus", False))


def run(fn, tensors, softplus, grad_out, **kw):
    """Output and the gradients of every input tensor for the loss ``<out, grad_out>``."""
    out = fn(**tensors, delta_softplus=softplus, **kw)
    grads = torch.autograd.grad(out, list(tensors.values()), grad_out.to(out.dtype))
    return out, dict(zip(tensors, grads, strict=True))


def rel_err(a, b):
    """Norm-wise relative error of ``a`` against the reference ``b`` (both upcast to float64)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def fresh(tensors, dtype):
    return {k: v.detach().to(dtype).requires_grad_() for k, v in tensors.items()}
