"""Evaluation: perplexity, lm-eval tasks, measured speed, reports and the CI gate."""
