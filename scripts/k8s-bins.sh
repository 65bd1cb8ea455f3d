#!/usr/bin/env bash
# Build a real Kubernetes control plane from Go modules (the Go module proxy only):
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, kwok and kwokctl, into
# a versioned cache directory. Does nothing when they are already there. Prints the directory.
#
#   bash scripts/k8s-bins.sh            # builds into ~/.cache/kubellm/k8s/v$K8S (or $KUBELLM_K8S_BINS)
#   K8S=1.36.4 ETCD=3.6.14 KWOK=0.8.0 bash scripts/k8s-bins.sh
#
# k8s.io/kubernetes cannot be `go install`ed (its go.mod replaces the staging modules with local
# paths), so a wrapper module requires it and replaces each staging module with its published
# v0.X.Y twin, read from the tag's own go.mod. etcd gets its own wrapper module for the same reason.
set -euo pipefail
K8S=${K8S:-1.36.4}
ETCD=${ETCD:-3.6.14}
KWOK=${KWOK:-0.8.0}
OUT=${KUBELLM_K8S_BINS:-$HOME/.cache/kubellm/k8s/v$K8S-etcd$ETCD-kwok$KWOK}
BINS=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok kwokctl)

have_all() {
  for b in "${BINS[@]}"; do [ -x "$OUT/$b" ] || return 1; done
}
if have_all; then
  echo "$OUT"
  exit 0
fi

mkdir -p "$OUT"
# One build at a time per cache directory (parallel test sessions may all ask for it).
exec 9>"$OUT.lock"
flock 9
if have_all; then
  echo "$OUT"
  exit 0
fi

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-trimpath
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
MINOR=$(cut -d. -f2 <<<"$K8S")
log() { echo "k8s-bins: $*" >&2; }
started=$SECONDS

# --- control plane ---------------------------------------------------------------------------
if [ ! -x "$OUT/kube-apiserver" ] || [ ! -x "$OUT/kubectl" ]; then
  log "building Kubernetes v$K8S (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl)"
  mkdir "$WORK/k8s" && cd "$WORK/k8s"
  go mod init local.test/k8s-control-plane >/dev/null 2>&1
  KMOD=$(go mod download -json "k8s.io/kubernetes@v$K8S" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  for m in $(sed -n 's#^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/.*#\1#p' "$KMOD"); do
    go mod edit -replace="$m=$m@v0.${K8S#1.}"
  done
  for g in $(sed -n 's/^godebug[[:space:]]\+\([^ (]*=.*\)$/\1/p' "$KMOD"); do
    go mod edit -godebug="$g"
  done
  go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@v$K8S" \
    "k8s.io/kubernetes/cmd/kube-controller-manager@v$K8S" \
    "k8s.io/kubernetes/cmd/kube-scheduler@v$K8S" "k8s.io/kubernetes/cmd/kubectl@v$K8S" >&2
  LDF="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    LDF+=" -X $p.gitVersion=v$K8S -X $p.gitMajor=1 -X $p.gitMinor=$MINOR -X $p.gitTreeState=clean"
    LDF+=" -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  go build -ldflags "$LDF" -o "$OUT/" k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl
  log "Kubernetes built after $((SECONDS - started)) s"
fi

# --- etcd (its own module, so that its dependencies are not mixed with Kubernetes') -------------
if [ ! -x "$OUT/etcd" ]; then
  log "building etcd v$ETCD"
  mkdir "$WORK/etcd" && cd "$WORK/etcd"
  go mod init local.test/etcd >/dev/null 2>&1
  cat >main.go <<'EOF'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  go get "go.etcd.io/etcd/server/v3@v$ETCD" >&2
  go mod tidy >&2
  go build -ldflags "-s -w" -o "$OUT/etcd" .
  log "etcd built after $((SECONDS - started)) s"
fi

# --- kwok (no replace directives: plain go install) ---------------------------------------------
if [ ! -x "$OUT/kwok" ] || [ ! -x "$OUT/kwokctl" ]; then
  log "building kwok v$KWOK"
  GOBIN="$OUT" go install "sigs.k8s.io/kwok/cmd/kwok@v$KWOK" "sigs.k8s.io/kwok/cmd/kwokctl@v$KWOK"
  log "kwok built after $((SECONDS - started)) s"
fi

have_all || { log "some binaries are missing in $OUT"; exit 1; }
log "all built in $((SECONDS - started)) s"
echo "$OUT"
