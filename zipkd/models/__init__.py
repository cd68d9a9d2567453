"""Model loading/saving, per-family architecture adapters and structural surgery."""
