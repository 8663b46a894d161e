"""Model backends the eval harness can ask: lmmkit checkpoints, HF folders, OpenAI-compatible endpoints."""
