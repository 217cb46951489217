"""Graphs and weights, pure numpy/networkx: the user's graph files, graph building, weight rules and their checks,
memory bounds, per-round schedules and the membership of a network whose agents leave and return. Imports config
only."""
