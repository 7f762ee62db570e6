"""Evaluation beyond held-out loss: task metrics, the lm-evaluation-harness adapter, human A/B sheets."""
