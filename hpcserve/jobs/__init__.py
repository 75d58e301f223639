"""Job submission: templates (sbatch), Python callables (submitit), the policy check, the torch env."""
