"""Process groups, megatron schedules with DDP, the CPU shim for them, and FP8 backends."""
