"""Compute FID and FD_DINOv2 (reference statistics, image folders, models). Not yet implemented."""

import sys

if __name__ == "__main__":
    sys.exit("calculate_metrics.py: not yet implemented (metrics issue); see README.md for the status.")
