"""The learning math: flat parameter layouts, the models and their written-out forwards, task batches, how a task
adapts (``adaptation``), and the meta-learning algorithms with their meta-gradients (``algorithms``). Imports config
only."""
