"""Datasets, Non-IID domains and corruptions (server side; see data/datasets.py and data/domains.py)."""
