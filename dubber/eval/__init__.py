"""Evaluation: the protocol (run.py), metrics without a model (metrics.py) and sync scores with the
expert (sync.py). Training may use metrics.py and sync.py; nothing here imports training."""
