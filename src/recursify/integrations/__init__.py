"""recursify inside other engines: `vllm` serves recursify checkpoints with vLLM (out of tree)."""
