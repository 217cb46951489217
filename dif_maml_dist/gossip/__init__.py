"""The Combine step: the per-round schemes (full state, compressed CHOCO gossip), the compressors, and the
combiners an agent receives (neighbours, all-reduce mean, none, failure-tolerant). Imports comm (the wire) and
graphs (the weights)."""
