"""minicpm-hal: one device-agnostic MiniCPM4 core on CPU, CUDA and Ascend NPU.

Public API: :func:`devices`, :func:`load_model`, :class:`DeviceUnavailable` (and the other
typed errors), :func:`bind` for op tables. Importing ``hal`` probes no device and imports no
accelerator library.
"""
from __future__ import annotations

import os
import sys

# With torch_npu installed but no CANN toolkit, torch's device-backend autoload makes
# ``import torch`` itself fail. Turn autoload off (only if torch is not imported yet and the
# user did not choose); the NPU probe imports torch_npu explicitly and reports the cause.
if "torch" not in sys.modules:
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

from hal.api import load_model, parse_dtype  # noqa: E402
from hal.probing import Device, devices  # noqa: E402
from hal.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    DeviceUnavailable,
    HalError,
    InputError,
    UnsupportedOpError,
)
from hal.registry import BoundOps, bind  # noqa: E402

__all__ = [
    "BoundOps", "CheckpointError", "ConfigError", "Device", "DeviceUnavailable", "HalError", "InputError",
    "UnsupportedOpError", "bind", "devices", "load_model", "parse_dtype",
]
