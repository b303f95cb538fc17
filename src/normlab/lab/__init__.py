"""The normlab lab: command-line studies that reproduce BatchNorm's failure modes and their cures."""
