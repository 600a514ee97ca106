"""The Dockerfile pins the versions setup.py asks for; every console entry point and example exists."""

from __future__ import annotations

import re

from tests.utils import REPO


def _setup_pins() -> dict[str, str]:
    text = (REPO / "setup.py").read_text()
    return dict(re.findall(r'"(megatron-core|sglang-router|sglang)([^"]*)"', text))


def _docker_pins() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text()
    return dict(re.findall(r'"(megatron-core|sglang-router|sglang)==([^"]+)"', text))


def test_dockerfile_versions_satisfy_setup_py():
    from packaging.specifiers import SpecifierSet

    setup, docker = _setup_pins(), _docker_pins()
    assert set(docker) == {"megatron-core", "sglang", "sglang-router"}
    for package, version in docker.items():
        assert version in SpecifierSet(setup[package]), \
            f"{package}: Dockerfile {version} vs setup.py {setup[package]}"


def test_dockerfile_uses_a_pinned_ngc_pytorch_base():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", text)


def _docker_env() -> dict[str, str]:
    """The variables the Dockerfile's ENV lines set in the image."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.split()[1:] for line in text.splitlines() if line.startswith("ENV ")]
    return dict(item.split("=", 1) for line in lines for item in line)


def test_sglang_venv_path_is_shared_with_the_launcher(monkeypatch):
    """In the container the trainer (sglang_launch) and the shell launchers ($SGLANG_PYTHON) must both use
    the venv the image builds."""
    from megatron_s2l.rollout import sglang_launch

    env = _docker_env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    venv = sglang_launch.sglang_venv()
    assert venv != sglang_launch.DEFAULT_VENV, "the launcher does not read the variable the image sets"
    assert f"python -m venv {venv} " in (REPO / "Dockerfile").read_text()
    assert env["SGLANG_PYTHON"] == str(venv / "bin" / "python")


def test_the_images_sglang_venv_is_one_the_launcher_accepts(tmp_path, monkeypatch):
    """The image marks its SGLang venv complete the way tools/sglang_cpu/setup_venv.sh does; without the
    mark the trainer would not find SGLang in the container."""
    from megatron_s2l.rollout import sglang_launch

    venv = _docker_env()["S2L_SGLANG_VENV"]
    stamp = re.search(rf"touch {re.escape(venv)}/(\S+)", (REPO / "Dockerfile").read_text())
    assert stamp, f"the Dockerfile does not mark {venv} complete"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    monkeypatch.setenv("S2L_SGLANG_VENV", str(tmp_path))
    assert sglang_launch.sglang_python() is None  # a venv without the mark: an unfinished install
    (tmp_path / stamp.group(1)).touch()
    assert sglang_launch.sglang_python() == tmp_path / "bin" / "python"
