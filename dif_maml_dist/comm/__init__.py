"""How agents talk: process set-up (torchrun environment, devices, threads, process groups), the transports (in
memory, over torch.distributed, and one gloo group per edge for continue mode) and liveness. The only package that
uses torch.distributed; imports config only."""
