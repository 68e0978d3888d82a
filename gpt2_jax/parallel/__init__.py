"""Running on many devices: the mesh and partition rules, multi-host start-up, and reading
the collectives of a compiled step."""
