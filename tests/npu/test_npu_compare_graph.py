"""compare's --decode-graph protocol on the emulated NPU: validation.floor.run_graph prefills
eagerly, then replays every teacher-forced decode step from the (emulated) NPUGraph."""
from __future__ import annotations

import torch

import hal
from npu_metrics import nmse
from validation import floor

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3, 250, 61]])
PROMPT = 6


def test_run_graph_replays_each_decode_step_and_matches_the_reference(emulated, d64_checkpoint, monkeypatch):
    from backends.npu.emulator import graphs as emulated_graphs

    replays: list = []
    replay = emulated_graphs.NPUGraph.replay
    monkeypatch.setattr(emulated_graphs.NPUGraph, "replay", lambda self: (replays.append(1), replay(self))[1])
    reference = hal.load_model(d64_checkpoint, "cpu", "float32", reference=True)
    npu = hal.load_model(d64_checkpoint, "npu")
    logits, hidden, mode = floor.run_graph(npu, IDS, PROMPT)
    assert len(replays) == IDS.shape[1] - PROMPT  # every decode position came from a replay
    assert "NPUGraph" in mode and "EMULATED" in mode and "npu.torch_npu_bsnd" in mode
    assert logits.shape == (IDS.shape[1], npu.config.vocab_size)
    assert all(h.shape[1] == PROMPT for h in hidden)  # a replay returns logits only
    expected = reference.logits(IDS)[0]  # no cache: an independent path to the same logits
    for t in range(IDS.shape[1]):
        err = nmse(expected[t], logits[t])
        assert err < 1e-3, f"position {t}: NMSE {err:.2e}"
