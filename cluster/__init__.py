"""gpufleet's operations on a Ray cluster: the head (up/down), status, GPU metrics, cluster.yaml
checks, and placement groups. Everything here talks to Ray; the planning it acts on is ``catalogue``."""
