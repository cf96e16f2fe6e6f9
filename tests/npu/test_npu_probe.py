"""NPU probing explains itself in one line, and a broken torch_npu never breaks ``import hal`` /
``import torch`` for CPU users. The libhccl.so case runs in a subprocess against a fake torch_npu
package that registers the real torch.backends entry point and fails as torch_npu 2.14 does
without CANN."""
from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import hal
from hal.probing import probe_npu, resolve
from hal.errors import DeviceUnavailable

REPO = Path(__file__).resolve().parents[2]
LIBHCCL = "libhccl.so: cannot open shared object file: No such file or directory"


def test_torch_npu_absent_gives_the_exact_reason(no_npu_env):
    found = probe_npu()
    assert not found.available
    assert found.reason == "torch_npu not installed (pip install 'minicpm-hal[npu]' on an Ascend host)"
    with pytest.raises(DeviceUnavailable) as info:
        resolve("npu")
    assert str(info.value) == f"device 'npu' is not available: {found.reason}"
    assert "\n" not in str(info.value)


def test_emulation_reports_an_available_emulated_npu(emulated):
    npu = {d.name: d for d in hal.devices()}["npu"]
    assert npu.available and "emulated" in npu.description
    assert resolve("npu") == "npu"
    import torch_npu

    assert torch_npu is emulated and torch_npu.npu.get_device_name().endswith("(emulated on CPU)")


def _fake_torch_npu(monkeypatch, npu_namespace) -> None:
    module = types.ModuleType("torch_npu")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", npu_namespace, raising=False)


def test_no_visible_device_and_driver_error(no_npu_env, monkeypatch):
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "")
    _fake_torch_npu(monkeypatch, types.SimpleNamespace(device_count=lambda: 0))
    want = "0 NPUs visible (ASCEND_RT_VISIBLE_DEVICES=''): check the driver with npu-smi info"
    assert probe_npu().reason == want

    def broken() -> int:
        raise RuntimeError("drvGetDevNum failed, error code 87\n  (more lines)")

    _fake_torch_npu(monkeypatch, types.SimpleNamespace(device_count=broken))
    assert probe_npu().reason == "NPU driver error: RuntimeError: drvGetDevNum failed, error code 87"


@pytest.fixture(scope="module")
def broken_torch_npu(tmp_path_factory) -> Path:
    """A site dir holding a torch_npu that fails like the real wheel without CANN, plus its
    dist-info with the ``torch.backends`` entry point torch autoloads."""
    site = tmp_path_factory.mktemp("broken_site")
    (site / "torch_npu").mkdir()
    (site / "torch_npu" / "__init__.py").write_text(
        f"raise ImportError({LIBHCCL!r})\n\ndef _autoload():\n    pass\n")
    info = site / "torch_npu-2.13.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.13.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    return site


def _run(code: str, site: Path) -> subprocess.CompletedProcess:
    drop = ("HAL_NPU_EMULATE", "TORCH_DEVICE_BACKEND_AUTOLOAD")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_broken_torch_npu_breaks_bare_torch_but_not_hal(broken_torch_npu):
    bare = _run("import torch", broken_torch_npu)
    assert bare.returncode != 0 and "Failed to load the backend extension: torch_npu" in bare.stderr, \
        "the fake must reproduce the real failure, or this test proves nothing"
    code = (
        "import hal, torch\n"
        "from hal.errors import DeviceUnavailable\n"
        "print(torch.ones(2).sum().item())\n"
        "print({d.name: d.reason for d in hal.devices()}['npu'])\n"
        "try:\n    hal.load_model('.', 'npu')\nexcept DeviceUnavailable as exc:\n    print(exc)\n"
    )
    ok = _run(code, broken_torch_npu)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.strip().splitlines()
    reason = ("torch_npu import failed: CANN library libhccl.so not found "
              "(install the CANN toolkit and run 'source <CANN>/set_env.sh')")
    assert lines == ["2.0", reason, f"device 'npu' is not available: {reason}"]
