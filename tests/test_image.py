"""The Dockerfile stays in step with the repository: what it copies exists and is in the build
context, it installs every distribution, and it holds the model the example serves.

No container runtime exists on CI machines, so the image is not built here; these checks catch
the drift that would break a build or a deployment (a renamed directory, a moved model path, a
different default-model version)."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
DISTRIBUTIONS = ("protocol", "engine", "server", "operator")


def _copied_sources() -> list[str]:
    sources = []
    for line in DOCKERFILE.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def _in_context(path: str) -> bool:
    """Whether .dockerignore lets `path` into the build context (last matching rule wins)."""
    included = True
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negated = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if pattern == "**" or fnmatch.fnmatch(path.rstrip("/"), pattern):
            included = negated
    return included


def test_copied_paths_exist_and_are_in_the_build_context() -> None:
    sources = _copied_sources()
    assert {f"{d}/" for d in DISTRIBUTIONS} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert _in_context(source), f"{source} is excluded by .dockerignore"


def test_every_distribution_is_built_and_installed() -> None:
    for dist in DISTRIBUTIONS:
        assert (ROOT / dist / "pyproject.toml").is_file()
        assert f"./{dist}" in DOCKERFILE
        assert f"/wheels/kubellm_{dist}-*.whl" in DOCKERFILE


def test_the_image_holds_the_model_the_example_serves() -> None:
    example = next(
        d
        for d in yaml.safe_load_all((ROOT / "examples/llmserver.yaml").read_text())
        if d and d.get("kind") == "LLMServer"
    )
    path = example["spec"]["model"]["path"]
    assert f"shutil.copytree(default_model_dir(), '{path}')" in DOCKERFILE
    assert f'CMD ["kubellm", "serve", "{path}"]' in DOCKERFILE


def test_default_model_version_matches_the_setup_script() -> None:
    setup = (ROOT / "scripts/setup.sh").read_text()
    pinned = re.search(r"^SMOLLM2_VERSION=(\S+)$", setup, re.M)
    in_image = re.search(r"^ARG SMOLLM2_VERSION=(\S+)$", DOCKERFILE, re.M)
    assert pinned and in_image and pinned.group(1) == in_image.group(1)


def test_runs_as_the_uid_the_operator_renders() -> None:
    from kubellm.operator.render import RenderConfig

    uid = RenderConfig().run_as_user
    assert re.search(rf"^USER {uid}:{uid}$", DOCKERFILE, re.M)
