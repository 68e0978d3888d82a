"""Training: the jitted train step, the loop around it, the optimizer, metrics, starting from
pretrained weights, what a resume may change, and the run directory and its lock."""
