"""Datasets: the benchmark registry, layout scanners, manifests, image loading, synthetic data."""
from .sample import Sample

_EXPORTS = {
    "get_dataset": "registry", "list_datasets": "registry", "parse_data_arg": "registry",
    "load_descriptions": "registry", "describe": "registry",
    "scan": "scanners", "load_data": "scanners", "scan_folder": "scanners",
    "read_jsonl": "manifest", "write_jsonl": "manifest", "read_meta": "manifest", "write_meta": "manifest",
    "load_image": "imageio", "load_mask": "imageio",
    "ZSADDataset": "dataset", "collate": "dataset",
    "generate_dataset": "synth",
}
__all__ = ["Sample", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
