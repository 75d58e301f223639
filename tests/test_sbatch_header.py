"""#SBATCH lines are read the way sbatch reads them: up to the first command, later lines winning."""

from __future__ import annotations

from hpcserve.jobs.sbatch_header import SbatchDefaults, sbatch_defaults, sbatch_options

SCRIPT = """#!/bin/bash
#SBATCH --job-name=train-x
#SBATCH -N 2 --ntasks-per-node=1   # one launcher per node
#SBATCH --gres=gpu:h100:4
#SBATCH -t 00:30:00
#SBATCH --array 0-3%2
# a comment between directives
#SBATCH --nodes=3
echo start
#SBATCH --partition=never-read
"""


def test_directives_until_the_first_command() -> None:
    opts = sbatch_options(SCRIPT)
    assert opts["job-name"] == "train-x" and opts["nodes"] == "3" and opts["array"] == "0-3%2"
    assert "partition" not in opts


def test_defaults() -> None:
    assert sbatch_defaults(SCRIPT) == SbatchDefaults(
        nodes=3, tasks_per_node=1, gpus_per_node=4, time="00:30:00", array="0-3%2", job_name="train-x"
    )


def test_gpus_per_node_and_short_forms() -> None:
    script = "#!/bin/sh\n#SBATCH -p infer -c4 --gpus-per-node=2 --gres=gpu:8\n#SBATCH -J=x\n"
    got = sbatch_defaults(script)
    assert (got.partition, got.cpus_per_task, got.gpus_per_node, got.job_name) == ("infer", 4, 2, "x")


def test_nothing_said() -> None:
    assert sbatch_defaults("#!/bin/bash\nsrun hostname\n") == SbatchDefaults()
