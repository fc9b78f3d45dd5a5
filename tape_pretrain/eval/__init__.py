"""Evaluation: perplexity at several lengths."""
