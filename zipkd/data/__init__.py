"""Local data: offline assets exported from installed packages, user files, calibration batches."""
