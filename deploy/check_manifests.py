"""Cross-object checks on a rendered overlay that schema validation and checkov cannot make.

Usage: python deploy/check_manifests.py RENDERED.yaml... (run by deploy/validate.sh).
Every reference must resolve inside the same render (ConfigMap, Secret and its keys,
ServiceAccount, HPA target), every selector must pick the pods it is meant for, every namespaced
object must sit in the overlay's namespace, every pod must do without service links, the
termination grace period must outlast the preStop pause plus the service's own drain time, and
every pod's traffic both ways must be limited by NetworkPolicy rules that each name their peers.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = {"Deployment", "Job"}
# The service's drain time after SIGTERM is a constant in its code; read it rather than repeat it.
# An ipBlock of these is no limit at all.
OPEN_CIDRS = ("0.0.0.0/0", "::/0")
DRAIN_PATTERN = re.compile(r"^GRACEFUL_SHUTDOWN_SECONDS\s*=\s*(\d+)\s*$", re.MULTILINE)


def drain_seconds(package: Path) -> int | None:
    """GRACEFUL_SHUTDOWN_SECONDS as defined somewhere in the service package, if it is."""
    for source in sorted(package.rglob("*.py")):
        match = DRAIN_PATTERN.search(source.read_text(encoding="utf-8"))
        if match:
            return int(match.group(1))
    return None


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """True when every label of a matchLabels selector is on the object."""
    return all(labels.get(key) == value for key, value in selector.items())


def containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The pod's init and regular containers."""
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def check_render(objects: list[dict[str, Any]], drain: int | None) -> list[str]:
    """Every problem found in one rendered overlay, as readable sentences."""
    problems: list[str] = []
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    namespaces = list(by_kind.get("Namespace", {}))
    if len(namespaces) != 1:
        problems.append(f"expected one Namespace, found {namespaces}")
    for obj in objects:
        if obj["kind"] in CLUSTER_SCOPED:
            continue
        where = obj["metadata"].get("namespace")
        if namespaces and where != namespaces[0]:
            name = f"{obj['kind']}/{obj['metadata']['name']}"
            problems.append(f"{name} is in namespace {where!r}, not {namespaces[0]!r}")

    secrets = by_kind.get("Secret", {})
    pod_labels: dict[str, dict[str, str]] = {}
    for kind in WORKLOADS:
        for name, workload in by_kind.get(kind, {}).items():
            template = workload["spec"]["template"]
            pod_labels[f"{kind}/{name}"] = template["metadata"]["labels"]
            problems += check_pod(f"{kind}/{name}", template["spec"], by_kind, secrets, drain)

    deployments = by_kind.get("Deployment", {})
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if not matches(deployment["spec"]["selector"]["matchLabels"], labels):
            problems.append(f"Deployment/{name}: its selector does not match its own pods")
        port = next(
            (
                p["containerPort"]
                for c in containers(deployment["spec"]["template"]["spec"])
                for p in c.get("ports", [])
                if p.get("name") == "http"
            ),
            None,
        )
        scrape_port = (
            deployment["spec"]["template"]["metadata"]
            .get("annotations", {})
            .get("prometheus.io/port")
        )
        if scrape_port is not None and str(port) != scrape_port:
            problems.append(f"Deployment/{name}: prometheus.io/port {scrape_port} is not {port}")
    api_pods = [labels for key, labels in pod_labels.items() if key.startswith("Deployment/")]
    for kind in ("Service", "PodDisruptionBudget"):
        for name, obj in by_kind.get(kind, {}).items():
            selector = obj["spec"]["selector"]
            if kind == "PodDisruptionBudget":
                selector = selector["matchLabels"]
            if not any(matches(selector, labels) for labels in api_pods):
                problems.append(f"{kind}/{name}: selects no Deployment's pods")
    policies = by_kind.get("NetworkPolicy", {})
    for owner, labels in pod_labels.items():
        covering = [
            policy["spec"]
            for policy in policies.values()
            if matches(policy["spec"]["podSelector"].get("matchLabels", {}), labels)
        ]
        for direction in ("Ingress", "Egress"):
            if not any(direction in spec.get("policyTypes", []) for spec in covering):
                problems.append(f"{owner}: no NetworkPolicy limits its {direction.lower()}")
    for name, policy in policies.items():
        problems += check_policy(f"NetworkPolicy/{name}", policy["spec"])
    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        target = hpa["spec"]["scaleTargetRef"]
        if target["kind"] != "Deployment" or target["name"] not in deployments:
            problems.append(f"HorizontalPodAutoscaler/{name}: targets a missing {target}")
        elif "replicas" in deployments[target["name"]]["spec"]:
            problems.append(f"Deployment/{target['name']}: sets replicas that the HPA owns")
    return problems


def check_policy(name: str, spec: dict[str, Any]) -> list[str]:
    """Problems with one NetworkPolicy: a rule that admits every address."""
    problems: list[str] = []
    for direction, peers in (("ingress", "from"), ("egress", "to")):
        for number, rule in enumerate(spec.get(direction, []), start=1):
            where = f"{name}: {direction} rule {number}"
            if not rule.get(peers):
                problems.append(f"{where} admits every address (no `{peers}`)")
            for peer in rule.get(peers, []):
                if peer.get("ipBlock", {}).get("cidr") in OPEN_CIDRS:
                    problems.append(f"{where} admits every address ({peer['ipBlock']['cidr']})")
    return problems


def check_pod(
    owner: str,
    pod: dict[str, Any],
    by_kind: dict[str, dict[str, dict[str, Any]]],
    secrets: dict[str, dict[str, Any]],
    drain: int | None,
) -> list[str]:
    """Problems with one pod template's references and shutdown timing."""
    problems: list[str] = []
    if pod.get("enableServiceLinks") is not False:
        # A Service named `db` would inject DB_PORT=tcp://…, which the settings refuse.
        problems.append(f"{owner}: enableServiceLinks is not false")
    account = pod.get("serviceAccountName")
    if account not in by_kind.get("ServiceAccount", {}):
        problems.append(f"{owner}: ServiceAccount {account!r} is not in the render")
    for container in containers(pod):
        for source in container.get("envFrom", []):
            if "configMapRef" in source and source["configMapRef"]["name"] not in by_kind.get(
                "ConfigMap", {}
            ):
                problems.append(f"{owner}: ConfigMap {source['configMapRef']['name']} is missing")
            if "secretRef" in source and source["secretRef"]["name"] not in secrets:
                problems.append(f"{owner}: Secret {source['secretRef']['name']} is missing")
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref is None or ref.get("optional"):
                continue
            secret = secrets.get(ref["name"])
            if secret is None:
                problems.append(f"{owner}: {env['name']} reads Secret {ref['name']}, not rendered")
            elif ref["key"] not in secret.get("data", {}):
                problems.append(f"{owner}: {env['name']} reads key {ref['key']}, not in the Secret")
        pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        if "livenessProbe" in container and drain is not None:
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if grace <= pause + drain:
                problems.append(
                    f"{owner}: terminationGracePeriodSeconds {grace} does not exceed the "
                    f"preStop pause {pause} s plus the service's drain {drain} s"
                )
    return problems


def main(paths: list[str]) -> int:
    """Check each rendered file; print the problems; 1 if there were any."""
    drain = drain_seconds(Path(__file__).resolve().parent.parent / "service")
    failed = drain is None
    if drain is None:
        print("GRACEFUL_SHUTDOWN_SECONDS not found in service/: update deploy/check_manifests.py")
    for path in paths:
        objects = [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc]
        problems = check_render(objects, drain)
        for problem in problems:
            print(f"{path}: {problem}")
        failed = failed or bool(problems)
        if not problems:
            print(f"{path}: {len(objects)} objects, references, selectors and timings consistent")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
