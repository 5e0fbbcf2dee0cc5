"""The paper's model: each concept in its own module, named as the paper names it.

backbone (frozen CLIP), router, experts (LoRA), fofs, moe (the adapter), paa, projections,
prompts, text, losses (ETF, balance, focal + Dice), scoring (maps and image scores in torch),
config (hyper-parameters), checkpoint (ours and official), moeclip (the :class:`MoECLIP` model).
"""
_EXPORTS = {
    "MoECLIP": "moeclip", "AdapterConfig": "config", "BackboneConfig": "config", "ModelConfig": "config",
    "load_model": "checkpoint", "save_checkpoint": "checkpoint", "Domain": "domain",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    # lazy: moeclip.model.config must stay importable without torch (CLI start-up)
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
