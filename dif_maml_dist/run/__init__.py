"""A run on disk and its recipes: checking a command line into a run context, the run directory and its lock,
checkpoints, metric sinks, outputs and summaries, saved models, and the recipes that wire comm, gossip and engine
into a networked or simulated run. Imports every package below it."""
