#!/usr/bin/env bash
# A local Kubernetes control plane for manual work: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kwok (fake GPU nodes; pods are simulated), from scripts/k8s-bins.sh.
#
#   eval "$(scripts/cluster.sh up)"   # build if needed, start the cluster `kubellm`, set KUBECONFIG
#   kubectl get nodes
#   scripts/cluster.sh env            # print the exports again
#   scripts/cluster.sh down           # stop it and remove its files
#
# The tests start their own cluster (`kubellm-test-<pid>`); both can run at once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in
  up | down | env) exec .venv/bin/python tests/k8s/cluster.py "$1" ;;
  *)
    echo "usage: $0 up|down|env" >&2
    exit 2
    ;;
esac
