"""What the report records about the machine: library versions, CANN/driver, device name.

Reads package metadata and version files only; imports no accelerator library."""
from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _version_file(*candidates: Path) -> str | None:
    """First ``version=...`` / ``Version=...`` value in the first readable candidate file."""
    for path in candidates:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        found = re.search(r"^\s*(?:version|Version|package_version)\s*=\s*(\S+)", text, re.MULTILINE)
        if found:
            return found.group(1)
    return None


def cann_version() -> str | None:
    roots = [os.environ.get(k) for k in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")]
    roots += ["/usr/local/Ascend/ascend-toolkit/latest"]
    files = []
    for root in filter(None, roots):
        base = Path(root)
        files += [base / "version.cfg", base / "compiler" / "version.info", base / "runtime" / "version.info"]
    return _version_file(*files)


def driver_version() -> str | None:
    """NVIDIA driver (from /proc) or Ascend driver (from its version.info), whichever exists."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        found = re.search(r"Kernel Module\s+([\d.]+)", text)
        if found:
            return f"nvidia {found.group(1)}"
    except OSError:
        pass
    ascend = _version_file(Path("/usr/local/Ascend/driver/version.info"))
    return f"ascend {ascend}" if ascend else None


def _memory_gib() -> float | None:
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def collect(device_description: str = "") -> dict[str, Any]:
    """The environment block of report.json (None where something is absent)."""
    import torch

    return {
        "device_name": device_description or None,
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_npu": package_version("torch_npu"),
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "cuda_runtime": torch.version.cuda,
        "cann": cann_version(),
        "driver": driver_version(),
    }
