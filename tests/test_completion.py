"""Shell completion through the real console script (``hpcserve``, whose ``main()`` builds click's context
itself): click's bash and zsh scripts, and its answers for commands and options, also from inside a real
bash that sourced the script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.prefix) / "bin"
HPCSERVE = str(BIN / "hpcserve")


def complete(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HPCSERVE], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **env})  # fmt: skip


BASH_HOOK = "complete -o nosort -F _hpcserve_completion hpcserve"


@pytest.mark.parametrize(("shell", "marker"), [("bash", BASH_HOOK), ("zsh", "#compdef hpcserve")])
def test_the_console_script_prints_the_shells_completion_script(shell: str, marker: str) -> None:
    out = complete({"_HPCSERVE_COMPLETE": f"{shell}_source"})
    assert out.returncode == 0 and marker in out.stdout and "_HPCSERVE_COMPLETE" in out.stdout, out.stderr


@pytest.mark.parametrize(
    ("words", "cword", "expected"),
    [
        ("hpcserve d", "1", ["db", "deployments", "doctor", "drain-node"]),
        ("hpcserve de", "1", ["deployments"]),
        ("hpcserve --site x.yaml re", "3", ["rebalance", "render", "report"]),
        ("hpcserve rebalance --a", "2", ["--apply"]),
        ("hpcserve db ", "2", ["status", "upgrade"]),
    ],
)
def test_bash_completes_commands_and_options(words: str, cword: str, expected: list[str]) -> None:
    out = complete({"_HPCSERVE_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": cword})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"plain,{word}" for word in expected]


def test_a_bash_that_sourced_the_script_completes() -> None:
    bash = shutil.which("bash")
    assert bash is not None
    script = ('source <(_HPCSERVE_COMPLETE=bash_source hpcserve)\n'
              'COMP_WORDS=(hpcserve de); COMP_CWORD=1\n'
              '_hpcserve_completion hpcserve\n'
              'printf "%s\\n" "${COMPREPLY[@]}"\n')  # fmt: skip
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    out = subprocess.run(
        [bash, "-c", script], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout.splitlines() == ["deployments"], out.stderr
