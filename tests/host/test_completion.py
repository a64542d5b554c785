"""`gridshed completion`: the bash script really completes commands and options in bash."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest


def _script(shell: str) -> str:
    r = subprocess.run([sys.executable, "-m", "gridshed.cli", "completion", shell], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("line, want", [("gridshed de", "deploy"), ("gridshed sim --heap", "--heapsize"),
                                        ("gridshed provision --dev", "--device-id")])
def test_bash_completes(tmp_path, line, want):
    bash = shutil.which("bash")
    assert bash, "bash is needed for this test (apt-get install bash)"
    (tmp_path / "c.bash").write_text(_script("bash"))
    words = line.split(" ")
    code = (f"source {tmp_path / 'c.bash'}; COMP_WORDS=({' '.join(words)}); COMP_CWORD={len(words) - 1}; "
            f"COMP_LINE='{line}'; COMP_POINT={len(line)}; _shtab_gridshed; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    r = subprocess.run([bash, "-c", code], capture_output=True, text=True)
    assert want in r.stdout.split(), (r.stdout, r.stderr)


def test_zsh_script_names_every_command():
    from gridshed.cli import build_parser

    text = _script("zsh")
    assert text.startswith("#compdef gridshed")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert name in text
