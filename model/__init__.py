"""The device-agnostic MiniCPM model core: config, checkpoint loading, layers calling hal ops,
caches, generation, synthetic checkpoints."""
