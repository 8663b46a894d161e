"""Analyses of trained models that look inside a forward pass (hallucination probes)."""
