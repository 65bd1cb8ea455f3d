"""Typed models of the LLMServer custom resource (serving.kubellm.io/v1alpha1).

The models are the single source of the CRD: `kubellm.operator.crd` turns their JSON schema
into a Kubernetes structural schema, and the docstring under each field becomes its description.
Python field names are snake_case; the wire names are camelCase aliases (`populate_by_name`, so
both are accepted). The checks that the API server makes with CEL rules (`x-kubernetes-validations`)
are repeated here as validators with the same messages, so a spec read back by the operator is
always one the renderer can handle.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP = "serving.kubellm.io"
VERSION = "v1alpha1"
KIND = "LLMServer"
PLURAL = "llmservers"
SINGULAR = "llmserver"
SHORT_NAMES = ("llms",)
API_VERSION = f"{GROUP}/{VERSION}"

SERVED_MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
"""Model names clients send: letters, digits and . _ : / - (no spaces), starting alphanumeric."""

TP_MESSAGE = (
    "tensor parallelism is not supported yet: set engine.tensorParallelSize to 1 "
    "and scale out with engine.replicas (data parallel)"
)
HEAD_MESSAGE = (
    "head.replicas must be 1 while engine.replicas > 0: engines register with a single head "
    "(scale API servers with head.apiServersPerPod instead)"
)
MODEL_MESSAGE = "model: set exactly one of path, pvc or huggingFace"
DEFAULT_REPLICAS = 1
DEFAULT_MAX_REPLICAS = 8
MAX_REPLICAS_MESSAGE = (
    "engine.replicas must not exceed engine.maxReplicas (the most engines the head accepts); "
    "raise engine.maxReplicas first, which restarts every pod"
)
TIMEOUT_MESSAGE = "shutdownTimeoutSeconds must be less than startupTimeoutSeconds"
SERVED_NAME_MESSAGE = (
    "servedModelName may contain only letters, digits and . _ : / - and must start with a "
    "letter or digit"
)


def _cel(rule: str, message: str) -> dict[str, Any]:
    return {"x-kubernetes-validations": [{"rule": rule, "message": message}]}


def _quantity(value: Any) -> Any:
    """Kubernetes quantities may be written as YAML numbers (`cpu: 4`); keep them as strings."""
    if isinstance(value, bool):
        raise ValueError("a resource quantity must be a string or a number, not a boolean")
    if isinstance(value, int | float):
        return str(value)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    WithJsonSchema({"x-kubernetes-int-or-string": True}),
]
"""A resource quantity such as "4", "500m" or "16Gi" (a number is accepted and kept as text)."""


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )


class PVCSource(_Model):
    """A PersistentVolumeClaim holding the model, mounted read-only at /models."""

    claim_name: str = Field(min_length=1, max_length=253)
    """Name of the PersistentVolumeClaim (in the LLMServer's namespace). Head and engine pods
    all mount it, so use a ReadOnlyMany claim when they may run on several nodes."""
    sub_path: str | None = Field(default=None, max_length=1024)
    """Directory inside the claim that holds the model (config.json, *.safetensors, tokenizer);
    default: the claim's root."""


class SecretKeyRef(_Model):
    """A key of a Secret in the LLMServer's namespace."""

    name: str = Field(min_length=1, max_length=253)
    """Secret name."""
    key: str = Field(min_length=1, max_length=253)
    """Key within the Secret."""


class HFSource(_Model):
    """A Hugging Face Hub repository, fetched by an init container."""

    id: str = Field(min_length=1, max_length=256)
    """Repository id, e.g. "Qwen/Qwen3-0.6B"."""
    revision: str = Field(default="main", min_length=1, max_length=256)
    """Branch, tag or commit to fetch. A branch is resolved when a pod starts, so pods started
    at different times may get different commits: pin a commit for reproducible rollouts."""
    token_secret_ref: SecretKeyRef | None = None
    """Secret key holding a Hugging Face access token (gated or private models)."""
    endpoint: str | None = Field(
        default=None, min_length=1, max_length=1024, pattern=r"^https?://[^\s]+$"
    )
    """Hub endpoint (HF_ENDPOINT), e.g. an in-cluster mirror; default: huggingface.co."""


class ModelSource(_Model):
    """Where the model comes from: exactly one of path, pvc or huggingFace."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            "(has(self.path) ? 1 : 0) + (has(self.pvc) ? 1 : 0) + "
            "(has(self.huggingFace) ? 1 : 0) == 1",
            MODEL_MESSAGE,
        )
    )

    path: str | None = Field(default=None, min_length=1, max_length=1024)
    """A model directory inside the image (or another volume), passed to `kubellm serve` as is."""
    pvc: PVCSource | None = None
    """A PersistentVolumeClaim holding the model, mounted read-only at /models."""
    hugging_face: HFSource | None = None
    """A Hugging Face Hub repository, fetched into an emptyDir at /models by an init container
    of each pod (`kubellm fetch-model`; head pods fetch only the config and tokenizer files)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        if sum(x is not None for x in (self.path, self.pvc, self.hugging_face)) != 1:
            raise ValueError(MODEL_MESSAGE)
        return self


class Resources(_Model):
    """Compute resources of one container, as in a Pod spec."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    """Resources the scheduler reserves, e.g. {cpu: "4", memory: 16Gi}."""
    limits: dict[str, Quantity] = Field(default_factory=dict)
    """Resource limits, e.g. {memory: 16Gi}. GPUs are set with engine.gpusPerPod."""


class EnvVar(_Model):
    """An environment variable of the engine containers."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    """Variable name."""
    value: str = Field(default="", max_length=32768)
    """Variable value."""


class EngineSpec(_Model):
    """The engine pods (a StatefulSet): one headless `kubellm serve` per pod, one rank each."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            # has(): the rule also checks the schema's default `{}`, before defaulting
            f"(has(self.replicas) ? self.replicas : {DEFAULT_REPLICAS}) <= "
            f"(has(self.maxReplicas) ? self.maxReplicas : {DEFAULT_MAX_REPLICAS})",
            MAX_REPLICAS_MESSAGE,
        )
    )

    replicas: int = Field(default=DEFAULT_REPLICAS, ge=0, le=1024)
    """Engine pods (data-parallel engines). 0 scales the engines down (the head stays, not
    ready). The scale subresource sets this field; changing it adds or removes engine pods
    without restarting the others."""
    max_replicas: int = Field(default=DEFAULT_MAX_REPLICAS, ge=1, le=1024)
    """The most engine pods (the head accepts ranks 0..maxReplicas-1). replicas may change up
    to this without any restart; changing maxReplicas itself restarts every pod."""
    tensor_parallel_size: int = Field(
        default=1, ge=1, le=64, json_schema_extra=_cel("self == 1", TP_MESSAGE)
    )
    """GPUs one engine shards the model across. Only 1 is supported for now."""
    gpus_per_pod: int = Field(default=1, ge=0, le=64)
    """nvidia.com/gpu limit of each engine pod; 0 runs the engine on CPU."""
    resources: Resources = Field(default_factory=Resources, json_schema_extra={"default": {}})
    """Compute resources of the engine container (GPUs: see gpusPerPod)."""
    image: str | None = Field(default=None, min_length=1, max_length=1024)
    """Container image of the engine pods; default: spec.image."""
    extra_args: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list, max_length=128
    )
    """Extra `kubellm serve` flags (e.g. ["--max-num-seqs", "128"]), given to the head and to
    every engine so that settings they must agree on (dtype, backend) match. Flags the operator
    sets from this spec (model, ports, data-parallel layout, ...) are refused."""
    env: list[EnvVar] = Field(default_factory=list, max_length=128)
    """Extra environment variables of the engine containers, and of the init containers that
    fetch a huggingFace model (e.g. HTTPS_PROXY)."""

    @field_validator("tensor_parallel_size")
    @classmethod
    def _tp_is_one(cls, value: int) -> int:
        if value != 1:
            raise ValueError(TP_MESSAGE)
        return value

    @model_validator(mode="after")
    def _within_max(self) -> EngineSpec:
        if self.replicas > self.max_replicas:
            raise ValueError(MAX_REPLICAS_MESSAGE)
        return self


class HeadSpec(_Model):
    """The head pods (a Deployment): CPU-only API servers that the engines register with."""

    replicas: int = Field(default=1, ge=1, le=64)
    """Head pods. Must be 1 while engine.replicas > 0 (engines register with one head)."""
    api_servers_per_pod: int = Field(default=1, ge=1, le=64)
    """API server processes per head pod (`--api-server-count`); each talks to every engine."""
    resources: Resources = Field(default_factory=Resources, json_schema_extra={"default": {}})
    """Compute resources of the head container."""


class Scheduling(_Model):
    """Where engine pods may run (the priority class applies to head pods too)."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the engine pods require, e.g. {nvidia.com/gpu.present: "true"}."""
    tolerations: list[dict[str, Any]] = Field(default_factory=list, max_length=64)
    """Tolerations of the engine pods, as in a Pod spec."""
    affinity: dict[str, Any] | None = None
    """Affinity of the engine pods, as in a Pod spec."""
    priority_class_name: str | None = Field(default=None, min_length=1, max_length=253)
    """PriorityClass of the head and engine pods."""


class Metrics(_Model):
    """Prometheus integration."""

    service_monitor: bool = False
    """Also create a ServiceMonitor (monitoring.coreos.com/v1; needs the Prometheus operator's
    CRDs) scraping /metrics of the head and engine pods."""


class LLMServerSpec(_Model):
    """An OpenAI-compatible LLM endpoint: one head and data-parallel engine pods."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.engine.replicas == 0 || self.head.replicas == 1",
                    "message": HEAD_MESSAGE,
                },
                {
                    "rule": "self.shutdownTimeoutSeconds < self.startupTimeoutSeconds",
                    "message": TIMEOUT_MESSAGE,
                },
            ]
        }
    )

    model: ModelSource
    """Where the model comes from: exactly one of path, pvc or huggingFace."""
    served_model_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        pattern=SERVED_MODEL_NAME_PATTERN,
    )
    """Model name clients use in requests; default: metadata.name."""
    max_model_len: int | None = Field(default=None, ge=16, le=16_777_216)
    """Longest sequence (prompt + output) in tokens; default: the model's own limit."""
    image: str | None = Field(default=None, min_length=1, max_length=1024)
    """Container image of all pods; default: the operator's --default-image."""
    engine: EngineSpec = Field(default_factory=EngineSpec, json_schema_extra={"default": {}})
    """The engine pods."""
    head: HeadSpec = Field(default_factory=HeadSpec, json_schema_extra={"default": {}})
    """The head pods."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Secret key holding the API key clients must send as a Bearer token (comma-separated for
    several keys); default: no authentication."""
    startup_timeout_seconds: int = Field(default=900, ge=30, le=86400)
    """How long a pod may take to start (model loading included) before it is restarted."""
    shutdown_timeout_seconds: int = Field(default=30, ge=0, le=3600)
    """How long in-flight requests may run on after a pod is told to stop."""
    scheduling: Scheduling = Field(default_factory=Scheduling, json_schema_extra={"default": {}})
    """Where the pods may run."""
    metrics: Metrics = Field(default_factory=Metrics, json_schema_extra={"default": {}})
    """Prometheus integration."""

    @model_validator(mode="after")
    def _coherent(self) -> LLMServerSpec:
        if self.engine.replicas > 0 and self.head.replicas != 1:
            raise ValueError(HEAD_MESSAGE)
        if self.shutdown_timeout_seconds >= self.startup_timeout_seconds:
            raise ValueError(TIMEOUT_MESSAGE)
        return self


class Condition(_Model):
    """A status condition, as in Kubernetes' metav1.Condition."""

    type: str
    """Ready, Progressing or Degraded."""
    status: str
    """"True", "False" or "Unknown"."""
    reason: str = ""
    """A CamelCase reason, e.g. Unschedulable, CrashLoop, Rolling, InvalidSpec."""
    message: str = ""
    """A human-readable explanation."""
    last_transition_time: str | None = None
    """When the status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """The metadata.generation this condition was computed for."""


class Counts(_Model):
    """Ready and desired pods of one component."""

    ready: int = 0
    """Pods that are ready."""
    desired: int = 0
    """Pods the spec asks for."""


class LLMServerStatus(_Model):
    """What the operator observed."""

    observed_generation: int | None = None
    """The metadata.generation the status was computed for."""
    conditions: list[Condition] = Field(default_factory=list)
    """Ready, Progressing and Degraded."""
    head: Counts = Field(default_factory=Counts)
    """Head pods."""
    engine: Counts = Field(default_factory=Counts)
    """Engine pods (the scale subresource reads engine.ready)."""
    url: str | None = None
    """The OpenAI base URL inside the cluster, e.g. http://NAME.NS.svc:8000/v1."""
    selector: str | None = None
    """Label selector of the engine pods (for the scale subresource)."""
    spec_hash: str | None = None
    """Hash of the spec the children were rendered from."""


def crd_manifest() -> dict[str, Any]:
    """The CustomResourceDefinition of LLMServer (see `kubellm.operator.crd`)."""
    from kubellm.operator.crd import crd_manifest as build  # crd imports this module

    return build()
