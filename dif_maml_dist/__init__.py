"""dif_maml_dist: decentralized multi-agent meta-learning (Dif-MAML) as a true multi-process runtime."""

__version__ = "0.1.0"
