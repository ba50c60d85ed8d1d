"""Serving what DiEP exports: the vLLM plugin for per-layer expert counts (``vllm.general_plugins`` entry point)."""
