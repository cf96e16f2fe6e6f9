"""CPU speed and memory benchmarks (pytest-benchmark suite and ``python -m benchmarks.cpu_speed``), and
the folded transformers-Llama twin of a MiniCPM checkpoint (``benchmarks.hf_llama``)."""
