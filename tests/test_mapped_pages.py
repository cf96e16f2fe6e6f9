"""The mapped checkpoint's pages leave the process with the last view of their tensor: a model keeps
resident only the mapped tensors it still references (read from the kernel: /proc/self/smaps)."""
from __future__ import annotations

import gc
import mmap
import sys

import pytest
import torch

import hal
from model.checkpoint import SINGLE
from model.quantize import main as quantize_main
from model.safetensors_mmap import SafetensorsFile, write_safetensors
from model.synthetic import write_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"),
                                reason="reads /proc/self/smaps and needs madvise(MADV_DONTNEED): Linux only")
PAGE = mmap.PAGESIZE


def fault_around(tmp_path) -> int:
    """Bytes a read fault on a file mapping makes resident on this kernel: Linux also maps the pages
    around it that the page cache holds (``fault_around_bytes``, 64 KiB by default), so touching a small
    tensor can make its neighbours' pages resident again. Measured: one float in the middle of 4 MiB."""
    path = tmp_path / "probe.safetensors"
    write_safetensors(path, {"a": torch.zeros(512 * 1024), "b": torch.ones(1), "c": torch.zeros(512 * 1024)})
    path.read_bytes()  # every page in the page cache, as a freshly written checkpoint's are
    f = SafetensorsFile(path)
    before = mapped_resident(path)
    assert float(f.tensor("b")[0]) == 1.0
    return mapped_resident(path) - before
ELEMENTS = 64 * 1024  # 256 KiB of float32 per tensor


def mapped_resident(path) -> int:
    """Bytes of ``path``'s mappings resident in this process (the kernel's Rss lines of its mappings)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) >= 6 and head[5] == str(path)
            elif inside and head and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


@pytest.fixture
def file(tmp_path):
    path = tmp_path / "three.safetensors"
    write_safetensors(path, {n: torch.full((ELEMENTS,), float(i)) for i, n in enumerate("abc")})
    return SafetensorsFile(path)


def _touched(f, name):
    t = f.tensor(name)
    assert float(t.sum()) == "abc".index(name) * ELEMENTS  # reads every page
    return t


def test_pages_leave_with_the_last_view(file):
    views = {n: _touched(file, n) for n in "abc"}
    full = mapped_resident(file.path)
    assert full >= 3 * ELEMENTS * 4
    del views["b"]
    gc.collect()
    dropped = full - mapped_resident(file.path)
    # the pages wholly inside b's bytes (a page shared with a neighbour stays)
    assert ELEMENTS * 4 - 2 * PAGE <= dropped <= ELEMENTS * 4
    assert torch.equal(views["a"], torch.zeros(ELEMENTS)) and torch.equal(views["c"], torch.full((ELEMENTS,), 2.0))


def test_a_derived_view_or_a_second_view_keeps_the_pages(file):
    t = _touched(file, "a")
    derived = t.view(256, 256)[1:]
    second = _touched(file, "b")
    again = file.tensor("b")
    base = mapped_resident(file.path)
    del t, second
    gc.collect()
    assert mapped_resident(file.path) == base  # `derived` shares a's storage, `again` is a view of b
    assert float(derived.sum()) == 0.0 and float(again.sum()) == ELEMENTS
    del derived, again
    gc.collect()
    assert base - mapped_resident(file.path) >= 2 * (ELEMENTS * 4 - 2 * PAGE)


def test_a_ternary_model_keeps_only_its_dense_tensors_resident(tmp_path):
    """quantize="ternary" packs linears that were zero-copy views of a bfloat16 checkpoint (o_proj,
    down_proj: the fused ones are copies anyway): their pages must not stay in the process beside the
    packed copies (before: the whole file stayed resident). The FFN is made wide enough that those
    views outweigh twice what the dense tensors may keep resident with this kernel's fault-around."""
    around = fault_around(tmp_path)
    layers, hidden, vocab = 2, 128, 1024  # the tiny preset's hidden and vocabulary
    dense_tensors = 1 + 2 * layers + 1  # embedding, two norms per layer, the final norm
    allowed_estimate = vocab * hidden * 2 + dense_tensors * (around + 3 * PAGE)
    ffn = max(4096, -(-3 * allowed_estimate // (layers * hidden * 2) // 256) * 256)
    source = write_checkpoint(tmp_path / "dense", "tiny", seed=3, dtype="bfloat16",
                              overrides={"intermediate_size": ffn, "num_hidden_layers": layers})
    assert quantize_main([str(source), str(tmp_path / "ternary"), "--format", "ternary"]) == 0
    path = tmp_path / "ternary" / SINGLE
    model = hal.load_model(tmp_path / "ternary", "cpu", "bfloat16", quantize="ternary")
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    assert torch.isfinite(model.logits(ids)).all()
    gc.collect()
    entries = SafetensorsFile(path).entries
    dense = [e for n, e in entries.items() if not n.endswith("proj.weight")]
    assert len(dense) == dense_tensors
    allowed = sum(e.end - e.begin + 2 * PAGE + around for e in dense)
    views = sum(e.end - e.begin for n, e in entries.items() if n.endswith(("o_proj.weight", "down_proj.weight")))
    assert views > 2 * allowed  # the bound below tells a kept view apart
    assert mapped_resident(path) <= allowed
