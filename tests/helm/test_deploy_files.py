"""deploy/: the Dockerfiles cannot be built here (no network to base images), so read them: every
instruction is a real one, FROM comes first, every COPY source exists, the images carry what the
chart runs (the gptoss-cluster command, ray, wget for KubeRay probes, `hf` for downloads), and the
chart's Ray version and image tags match the project."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from tests.helm.helm_chart import CHART
from tests.tooling import REPO_ROOT

DOCKERFILES = {"gpu": REPO_ROOT / "deploy" / "Dockerfile.gpu", "cpu": REPO_ROOT / "deploy" / "Dockerfile.cpu"}
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "EXPOSE", "CMD", "ENTRYPOINT", "USER",
                "LABEL", "VOLUME", "HEALTHCHECK", "SHELL", "STOPSIGNAL", "ONBUILD"}


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0], line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("flavor", list(DOCKERFILES))
def test_dockerfile_parses_and_copies_only_existing_paths(flavor):
    parsed = instructions(DOCKERFILES[flavor])
    assert {i for i, _ in parsed} <= INSTRUCTIONS
    assert [i for i, _ in parsed if i != "ARG"][0] == "FROM"
    copies = [args.split() for i, args in parsed if i == "COPY"]
    assert copies
    for *sources, _dest in copies:
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"{flavor}: COPY {source} does not exist in the repository"
    # Everything the package needs at run time is copied (setuptools finds cluster* and gptoss*).
    copied = {s for *sources, _ in copies for s in sources}
    assert {"pyproject.toml", "cluster", "gptoss", "protos"} <= copied
    text = DOCKERFILES[flavor].read_text()
    assert "wget" in text  # KubeRay's readiness probes use it
    assert "huggingface_hub[cli]" in text  # `hf download` of the chart's weight download step
    assert re.search(r"pip install (--no-deps )?\.", text)


def test_gpu_image_is_cuda_with_vllm_and_cpu_image_has_neither():
    gpu = " ".join(f"{i} {a}" for i, a in instructions(DOCKERFILES["gpu"]))
    cpu = " ".join(f"{i} {a}" for i, a in instructions(DOCKERFILES["cpu"]))  # comments left out
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+", gpu) and 'vllm==${VLLM_VERSION}' in gpu
    assert "cuda" not in cpu.lower() and "vllm" not in cpu.lower()
    assert "download.pytorch.org/whl/cpu" in cpu


def test_gpu_image_requirements_step_keeps_every_dependency_but_torch(tmp_path):
    """Run the GPU Dockerfile's own requirements snippet against pyproject.toml."""
    snippet = re.search(r'python -c "(import tomllib;.*?)" > /tmp/requirements.txt', DOCKERFILES["gpu"].read_text()).group(1)
    out = subprocess.run([sys.executable, "-c", snippet],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(out) == sorted(d.replace(" ", "") for d in deps if not d.startswith("torch"))
    assert any(d.startswith("ray[serve]") for d in out)


def test_chart_matches_the_project_ray_version_command_and_image_tags():
    import ray

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["ray"]["version"] == ray.__version__
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "gptoss-cluster" in scripts
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version
    for preset, flavor in (("values-gpt-oss-120b.yaml", "gpu"), ("values-gpt-oss-20b.yaml", "gpu"),
                           ("values-tiny-cpu.yaml", "cpu")):
        assert yaml.safe_load((CHART / preset).read_text())["image"]["tag"] == f"{version}-{flavor}"
        assert f"{version}-{flavor}" in DOCKERFILES[flavor].read_text()


def test_operator_guide_names_match_the_chart():
    """docs/kubernetes.md: every alert is explained, every gptoss metric it names exists, every
    preset and Service name it gives is what the chart has and renders (release "gptoss")."""
    from tests.helm.helm_chart import one, render
    from tests.helm.test_helm_monitoring import exported_metric_names, rule_expressions

    doc = (REPO_ROOT / "docs" / "kubernetes.md").read_text()
    for alert, _ in rule_expressions():
        assert f"`{alert}`" in doc, f"docs/kubernetes.md does not explain {alert}"
    named = set(re.findall(r"`(gptoss_[a-z0-9_]+)`", doc))
    assert named and named <= exported_metric_names(), sorted(named - exported_metric_names())
    for preset in set(re.findall(r"values-[\w.-]+\.yaml", doc)):
        assert (CHART / preset).is_file(), preset
    objects = render("tiny-cpu")
    for kind, suffix in (("Service", "-frontdoor"), ("RayService", "")):
        assert f"{one(objects, kind, suffix)['metadata']['name']}" in doc.replace("<release>", "gptoss")
