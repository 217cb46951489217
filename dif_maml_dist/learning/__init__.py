"""The learning math: flat parameter layouts, the models and their written-out forwards, MAML meta-gradients and
adaptation curves. Imports config only."""
