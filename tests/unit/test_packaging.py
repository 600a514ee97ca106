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
        assert version in SpecifierSet(setup[package]), f"{package}: Dockerfile {version} vs setup.py {setup[package]}"


def test_dockerfile_uses_a_pinned_ngc_pytorch_base():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", text)


def test_sglang_venv_path_is_shared_with_the_launcher():
    docker = (REPO / "Dockerfile").read_text()
    from megatron_s2l.rollout import sglang_launch

    assert "S2L_SGLANG_VENV=/opt/sglang" in docker
    assert "S2L_SGLANG_VENV" in (REPO / "megatron_s2l/rollout/sglang_launch.py").read_text()
    assert callable(sglang_launch.sglang_python)


def test_the_images_sglang_venv_is_one_the_launcher_accepts(tmp_path, monkeypatch):
    """The image marks its SGLang venv complete the way tools/sglang_cpu/setup_venv.sh does; without the
    mark the trainer would not find SGLang in the container."""
    from megatron_s2l.rollout import sglang_launch

    stamp = re.search(r"touch /opt/sglang/(\S+)", (REPO / "Dockerfile").read_text())
    assert stamp, "the Dockerfile does not mark /opt/sglang complete"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    monkeypatch.setenv("S2L_SGLANG_VENV", str(tmp_path))
    assert sglang_launch.sglang_python() is None  # a venv without the mark: an unfinished install
    (tmp_path / stamp.group(1)).touch()
    assert sglang_launch.sglang_python() == tmp_path / "bin" / "python"
