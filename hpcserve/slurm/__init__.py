"""Slurm access: one SlurmClient protocol, a complete CLI backend and a thin optional pyslurm backend."""
