"""dif_maml_dist: decentralized multi-agent meta-learning (Dif-MAML) as a true multi-process runtime."""

__version__ = "0.1.0"
__all__ = ["load_run"]


def __getattr__(name: str):
    # Lazily, so that importing a light module (dif_maml_dist.config) does not import torch.
    if name == "load_run":
        from .evaluate import load_run

        return load_run
    raise AttributeError(f"module 'dif_maml_dist' has no attribute {name!r}")
