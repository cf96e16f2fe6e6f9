"""The emulated NPUGraph keeps a real graph's contract: replay re-runs the captured kernels on
the captured buffers (new input values flow through, Python does not run again), and host reads
or data-dependent shapes are refused while capturing."""
from __future__ import annotations

import pytest
import torch

from backends.npu.emulator.graphs import GraphCaptureError, NPUGraph, graph


def _program(x: torch.Tensor, w: torch.Tensor, calls: list) -> torch.Tensor:
    """Exercises what a decode step does: dtype casts (.float(), .to), a transposed reshape that
    copies, an in-place op on an intermediate, an out= matmul into a slice, views, gather."""
    calls.append(1)
    h = (x * 2).float()
    t = h.t().reshape(-1)  # a copy (transposed)
    t.add_(1.0)
    out = torch.empty(2, 3, dtype=torch.float32)
    torch.mm(w, t.view(3, -1)[:, :1].expand(3, 1).contiguous(), out=out[:, :1])
    out[:, 1:] = h[:2, :2].to(torch.float32)
    idx = x.argmax(dim=1, keepdim=True)
    return torch.cat([out.sum(dim=1, keepdim=True), x.float().gather(1, idx)[:2]], dim=1)


def test_replay_computes_on_new_inputs_and_does_not_run_python():
    x = torch.randn(3, 4).to(torch.bfloat16)
    w = torch.randn(2, 3)
    calls: list = []
    g = NPUGraph()
    with torch.inference_mode():
        with graph(g):
            y = _program(x, w, calls)
        for _ in range(3):
            new = torch.randn(3, 4).to(torch.bfloat16)
            x.copy_(new)
            g.replay()
            expected = _program(new, w, [])
            assert torch.equal(y, expected)
    assert calls == [1]  # replays did not call Python
    assert g.op_count > 10


def test_python_values_read_at_capture_stay_frozen():
    x = torch.zeros(3)
    scale = {"value": 2.0}
    g = NPUGraph()
    with torch.inference_mode():
        with graph(g):
            y = x + scale["value"]
        scale["value"] = 5.0
        g.replay()
    assert torch.equal(y, torch.full((3,), 2.0))


@pytest.mark.parametrize("read", [
    lambda t: t.sum().item(), lambda t: int(t[0]), lambda t: bool(t.any()), lambda t: t.tolist(),
    lambda t: t.numpy(), lambda t: t.nonzero(), lambda t: t[t > 0], lambda t: float(t.max()),
], ids=["item", "int", "bool", "tolist", "numpy", "nonzero", "bool-mask", "float"])
def test_host_reads_and_data_dependent_shapes_are_refused(read):
    x = torch.arange(4.0)
    g = NPUGraph()
    with torch.inference_mode():
        with pytest.raises(GraphCaptureError, match="not permitted while capturing"):
            with graph(g):
                read(x)
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0]  # the capture guard is gone after the failure
    with pytest.raises(GraphCaptureError, match="replay before a finished capture"):
        g.replay()


def test_capture_twice_needs_reset():
    g = NPUGraph()
    with torch.inference_mode():
        with graph(g):
            torch.zeros(2) + 1
        with pytest.raises(GraphCaptureError, match="reset"):
            g.capture_begin()
        g.reset()
        with graph(g):
            torch.zeros(2) + 1
