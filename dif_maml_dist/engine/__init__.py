"""What runs the agents: the agent (Adapt, then its Combine step), the cohorts a process drives, the training loop
shared by torchrun and the simulator, the learner (model, loss, test sets on a device) and the simulator. Imports
gossip, tasks, comm, learning, graphs."""
