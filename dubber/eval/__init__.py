"""Evaluation: image/sharpness/landmark/sync metrics (metrics.py) and the SyncNet sync expert (syncnet.py)."""
