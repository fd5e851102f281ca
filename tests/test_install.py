"""install.sh picks a Python 3.11+ among python3, python and the versioned names, and says in one line
what it found where there is none (run on a PATH of stand-in interpreters: nothing is installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _fake_python(folder: Path, name: str, version: str, log: Path) -> None:
    """A stand-in interpreter of ``version``: it answers install.sh's version checks and fails (and logs)
    anything else, such as ``-m venv``."""
    good = tuple(int(part) for part in version.split(".")[:2]) >= (3, 11)
    script = folder / name
    script.write_text("#!/bin/sh\n"
                      "case \"$*\" in\n"
                      f"  *'sys.version_info >= (3, 11)'*) exit {0 if good else 1} ;;\n"
                      f"  *platform*) echo {version} ;;\n"
                      f"  *version_info*) echo {'.'.join(version.split('.')[:2])} ;;\n"
                      f"  *) echo \"$0 $*\" >> {log}; exit 1 ;;\n"
                      "esac\n")
    script.chmod(0o755)


def _run(tmp_path: Path, pythons: dict[str, str]) -> tuple[subprocess.CompletedProcess, str]:
    bin_dir, repo = tmp_path / "bin", tmp_path / "repo"
    bin_dir.mkdir()
    repo.mkdir()
    shutil.copy(ROOT / "install.sh", repo / "install.sh")
    for tool in ("sh", "dirname", "sed", "rm", "id"):  # and no apt-get: a failed venv stops with one line
        shutil.which(tool) and (bin_dir / tool).symlink_to(shutil.which(tool))
    log = tmp_path / "calls.log"
    for name, version in pythons.items():
        _fake_python(bin_dir, name, version, log)
    done = subprocess.run([shutil.which("bash"), str(repo / "install.sh")], capture_output=True, text=True,
                          env={"PATH": str(bin_dir)}, timeout=60)
    return done, log.read_text() if log.exists() else ""


@pytest.mark.skipif(shutil.which("bash") is None, reason="install.sh is a bash script")
def test_install_takes_the_first_python_new_enough(tmp_path):
    done, calls = _run(tmp_path, {"python3": "3.10.12", "python3.12": "3.12.3"})
    assert done.returncode == 1
    # python3 (3.10) was passed over for python3.12, which was asked to make the venv
    assert "python3.12 -m venv" in calls and "python3 -m" not in calls.replace("python3.12 -m", "")
    # with no apt-get to run, the line names the venv package of the Python taken
    assert done.stderr.strip().endswith("python3.12 -m venv failed; install python3.12-venv (sudo apt-get install "
                                        "python3.12-venv) and re-run"), done.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="install.sh is a bash script")
def test_install_names_the_pythons_it_found_when_none_is_new_enough(tmp_path):
    done, calls = _run(tmp_path, {"python3": "3.10.12", "python": "3.9.2"})
    assert done.returncode == 1 and calls == ""
    line = done.stderr.strip()
    assert "\n" not in line
    assert "python3 is Python 3.10.12; " in line and "python is Python 3.9.2; " in line
    assert line.endswith("gsae needs 3.11 or newer (its store, zarr 3, does)")


@pytest.mark.skipif(shutil.which("bash") is None, reason="install.sh is a bash script")
def test_install_without_python(tmp_path):
    done, calls = _run(tmp_path, {})
    assert done.returncode == 1
    assert done.stderr.strip() == "install.sh: no python3 or python on PATH; install Python 3.11 or newer"
