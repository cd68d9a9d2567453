"""Latency tables: per-block latencies measured on the target device and regime, and predictions from them."""
