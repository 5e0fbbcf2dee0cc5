"""Datasets: the benchmark registry, layout scanners, manifests, image loading, synthetic data."""
from .sample import Sample

__all__ = ["Sample"]
