"""`kubellm-operator`: run the operator (kopf) or print the CRD.

    kubellm-operator run --namespace NS [--namespace NS2 ...] [--default-image IMG]
    kubellm-operator run --all-namespaces [--kubeconfig PATH] [--liveness URL]
    kubellm-operator crd > crds/serving.kubellm.io_llmservers.yaml

`run` is standalone (no kopf peering objects needed): the chart runs one replica with the
Recreate strategy. SIGTERM and SIGINT stop it cleanly (kopf finishes or cancels the handlers in
flight and exits 0).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from kubellm.operator.config import DEFAULT_IMAGE, OperatorConfig

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubellm-operator", description="Reconciles LLMServer resources (kopf)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the operator")
    scope = run.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "--namespace", "-n", action="append", default=[], help="namespace to serve (repeatable)"
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="serve every namespace")
    run.add_argument(
        "--default-image",
        default=os.environ.get("KUBELLM_OPERATOR_DEFAULT_IMAGE") or DEFAULT_IMAGE,
        help="image of pods whose LLMServer sets no spec.image "
        "(env KUBELLM_OPERATOR_DEFAULT_IMAGE; default %(default)s)",
    )
    run.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then KUBECONFIG)")
    run.add_argument("--liveness", help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    run.add_argument(
        "--metrics-port",
        type=int,
        help="serve the operator's Prometheus metrics on this port (/metrics); default: off",
    )
    run.add_argument("--log-format", choices=("plain", "json"), default="plain")
    run.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    commands.add_parser("crd", help="print the LLMServer CustomResourceDefinition as YAML")
    return parser


def _stopped_while_starting(signum: int, frame: FrameType | None) -> None:
    """SIGTERM before kopf installs its own handlers: nothing to drain, exit 0."""
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stopped_while_starting)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "crd":
        from kubellm.operator import crd

        sys.stdout.write(crd.crd_yaml())
        return 0
    try:
        config = OperatorConfig(
            default_image=args.default_image,
            namespaces=tuple(args.namespace),
            clusterwide=args.all_namespaces,
            kubeconfig=args.kubeconfig,
            liveness_endpoint=args.liveness,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.metrics_port is not None:
        if not 0 < args.metrics_port < 65536:
            parser.error(f"--metrics-port {args.metrics_port} is not a TCP port")
        from kubellm.operator import metrics

        metrics.serve(args.metrics_port)
    return run(config, json_logs=args.log_format == "json", verbose=args.verbose)


def run(config: OperatorConfig, *, json_logs: bool = False, verbose: bool = False) -> int:
    """Run kopf with our handlers until SIGTERM/SIGINT."""
    if config.kubeconfig:
        # kopf logs in through the kubernetes client, which reads $KUBECONFIG when it is first
        # imported: set it before that import.
        os.environ["KUBECONFIG"] = config.kubeconfig
    import kopf

    from kubellm.operator import handlers

    kopf.configure(
        verbose=verbose,
        log_format=kopf.LogFormat.JSON if json_logs else kopf.LogFormat.FULL,
        log_prefix=True,
    )
    logger.info(
        "kubellm-operator starting: %s, default image %s",
        "all namespaces" if config.clusterwide else "namespaces " + ",".join(config.namespaces),
        config.default_image,
    )
    kopf.run(
        registry=handlers.registry,
        standalone=True,
        clusterwide=config.clusterwide,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness_endpoint,
        memo=kopf.Memo(config=config),
    )
    logger.info("kubellm-operator stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
