"""hpcserve: a Slurm orchestrator for GPU clusters that run training jobs and bursty LLM inference.

Importing the package is cheap on purpose: the CLI's start time depends on it. Submodules are imported
where they are used.
"""

__version__ = "0.1.0"
