"""The operator's own settings, parsed once from the command line and passed down.

`OperatorConfig` travels to the kopf handlers through kopf's `memo` (see `cli.py`); nothing reads
argv or the environment anywhere else.
"""

from __future__ import annotations

import dataclasses

from kubellm.operator import render

FIELD_MANAGER = "kubellm-operator"
"""Server-side apply field manager of every object the operator writes."""

LABEL_NAME = render.NAME_LABEL
"""Label that ties a child (and its pods) to its LLMServer; the children watches select on it."""

LABEL_COMPONENT = render.COMPONENT_LABEL
"""Label with the child's role: head or engine."""

ANNOTATION_APPLIED = "serving.kubellm.io/applied-hash"
"""Hash of the manifest the operator last applied to a child; equal hash → no write (R24)."""

KOPF_PREFIX = "serving.kubellm.io"
"""Prefix of kopf's bookkeeping annotations on LLMServer objects (no `status.kopf`)."""

DEFAULT_IMAGE = render.RenderConfig.default_image
"""Image of head and engine pods when the LLMServer sets none and --default-image is absent."""


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """Settings of one `kubellm-operator run`."""

    default_image: str = DEFAULT_IMAGE
    """Image for pods whose LLMServer sets no `spec.image`."""
    namespaces: tuple[str, ...] = ()
    """Namespaces to serve; empty with `clusterwide` means every namespace."""
    clusterwide: bool = False
    """Serve LLMServers in all namespaces (needs a ClusterRole)."""
    kubeconfig: str | None = None
    """Kubeconfig file; default: in-cluster service account, then $KUBECONFIG / ~/.kube/config."""
    liveness_endpoint: str | None = None
    """kopf liveness endpoint such as http://0.0.0.0:8080/healthz; None: no endpoint."""

    def __post_init__(self) -> None:
        if not self.default_image.strip():
            raise ValueError("--default-image must not be empty")
        if self.clusterwide and self.namespaces:
            raise ValueError("use either --namespace or --all-namespaces, not both")
        if not self.clusterwide and not self.namespaces:
            raise ValueError("name a --namespace (repeatable) or pass --all-namespaces")
        for ns in self.namespaces:
            if not ns or ns != ns.strip():
                raise ValueError(f"invalid namespace {ns!r}")

    def render_config(self) -> render.RenderConfig:
        """What the renderer needs from the operator's settings."""
        return render.RenderConfig(default_image=self.default_image)
