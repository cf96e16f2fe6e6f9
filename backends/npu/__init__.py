"""Ascend NPU backend (torch_npu fused ops). Not implemented yet: registers nothing, so binding
on ``npu`` raises UnsupportedOpError unless fallback is allowed."""
