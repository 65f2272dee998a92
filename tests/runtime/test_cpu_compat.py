"""The CPU layer is inert until activated, then lets CUDA-assuming code run on CPU."""

import subprocess
import sys
import textwrap

import torch


def _run(code):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_activation_on_cpu_patches_cuda_calls():
    if torch.cuda.is_available():
        return
    out = _run("""
        import torch
        from avr_megatron.runtime import cpu_compat
        assert not cpu_compat.is_active() and not cpu_compat.PATCHES
        try:
            torch.zeros(2, device="cuda")
            raise SystemExit("cuda tensor should fail before activation")
        except (RuntimeError, AssertionError):
            pass
        assert cpu_compat.activate() and cpu_compat.activate()  # idempotent
        x = torch.zeros(2, device="cuda")
        assert x.device.type == "cpu" and x.cuda() is x
        assert torch.ones(1).to("cuda").device.type == "cpu"
        assert torch.cuda.current_device().type == "cpu"
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        s = torch.cuda.current_stream(); s.wait_stream(s); torch.cuda.synchronize()
        assert all(reason for _, reason in cpu_compat.PATCHES)

        class Recompute(torch.autograd.Function):  # backward allocates on "cuda", as recompute does
            @staticmethod
            def forward(ctx, x):
                return x * 2
            @staticmethod
            def backward(ctx, g):
                return g * torch.full((2,), 2.0, device="cuda")
        x = torch.ones(2, requires_grad=True)
        Recompute.apply(x).sum().backward()
        torch.autograd.backward([Recompute.apply(x).sum()], [torch.tensor(3.0)])
        assert x.grad.tolist() == [8.0, 8.0], x.grad
        print(len(cpu_compat.PATCHES))
    """)
    assert int(out.strip()) >= 10
