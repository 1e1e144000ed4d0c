"""The pod's settings as podman flags, read from the manifests, and the containers they run.

Every setting of k8s/base that decides what the process may do is translated, or refused when
it cannot be: user and group, read-only root file system, dropped capabilities, no privilege
escalation, the emptyDir on /tmp and its size, the ConfigMap's environment, the grace period.
The containers share the host's network (podman's own networks need more than this machine
allows), so the service listens on a port of its own instead of the pod's 8000.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "k8s" / "base"
CONFIG_ENV = BASE / "config.env"
# The one volume the pods mount, an emptyDir.
SCRATCH = "/tmp"  # noqa: S108 - the pod's mount path, not a file of this process


@dataclasses.dataclass(frozen=True)
class PodShape:
    """What one container of k8s/base runs as."""

    user: int
    group: int
    tmp_size: str
    grace_seconds: int
    pre_stop_seconds: int
    args: tuple[str, ...]

    def flags(self) -> list[str]:
        """podman run flags for this shape (seccomp: podman's default is the RuntimeDefault)."""
        return [
            "--user", f"{self.user}:{self.group}",
            # --read-only alone would also put tmpfs on /run and /var/tmp, which the pod has not.
            "--read-only", "--read-only-tmpfs=false",
            "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
            # An emptyDir: writable by the (unprivileged) process, limited to its sizeLimit.
            "--tmpfs", f"{SCRATCH}:rw,size={self.tmp_size},mode=1777",
            "--env-file", str(CONFIG_ENV),
            "--network", "host",
        ]  # fmt: skip


def _documents(name: str) -> list[dict[str, Any]]:
    with (BASE / name).open() as manifest:
        return [document for document in yaml.safe_load_all(manifest) if document]


def _quantity_to_tmpfs(quantity: str) -> str:
    """A Kubernetes size (64Mi) as a tmpfs size (64m)."""
    units = {"Ki": "k", "Mi": "m", "Gi": "g"}
    for suffix, unit in units.items():
        if quantity.endswith(suffix):
            return quantity.removesuffix(suffix) + unit
    raise ValueError(f"emptyDir sizeLimit {quantity!r}: no tmpfs size for it")


def pod_shape(manifest: str, container_name: str) -> PodShape:
    """The shape of `container_name` in k8s/base/`manifest`, refusing what podman cannot repeat."""
    (workload,) = _documents(manifest)
    pod = workload["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == container_name]
    context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    expected = {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    for key, value in expected.items():
        if context.get(key) != value:
            raise ValueError(f"{manifest}: securityContext {key} is {context.get(key)!r}")
    mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}
    if set(mounts) != {SCRATCH}:
        raise ValueError(f"{manifest}: volume mounts {sorted(mounts)}, this check knows /tmp only")
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[SCRATCH]]
    env_from = [source["configMapRef"]["name"] for source in container.get("envFrom", [])]
    if env_from != ["playing-with-neon-config"]:
        raise ValueError(f"{manifest}: envFrom {env_from}, expected the ConfigMap alone")
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
    return PodShape(
        user=int(context["runAsUser"]),
        group=int(context["runAsGroup"]),
        tmp_size=_quantity_to_tmpfs(volume["emptyDir"]["sizeLimit"]),
        grace_seconds=int(pod.get("terminationGracePeriodSeconds", 30)),
        pre_stop_seconds=int(pre_stop.get("seconds", 0)),
        args=tuple(container.get("args", [])),
    )


class Podman:
    """podman with the build's environment; remembers the containers it created, to remove them."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.created: list[str] = []

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`podman ARGS`, output captured."""
        return subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(
        self, name: str, shape: PodShape, env: dict[str, str], *extra: str, detach: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Create and start container `name` as `shape`, with `env` over the ConfigMap's."""
        self.created.append(name)
        variables = [item for key, value in env.items() for item in ("--env", f"{key}={value}")]
        mode = ["--detach"] if detach else []
        return self.run(
            "run", *mode, "--name", name, *shape.flags(), *variables, *extra, timeout=300
        )

    def inspect(self, name: str, template: str) -> str:
        """One field of `podman inspect`."""
        return self.run("inspect", "--format", template, name).stdout.strip()

    def changed_paths(self, name: str) -> set[str]:
        """What the container changed in the image's file system (`podman diff`)."""
        return set(self.run("diff", name).stdout.split("\n")) - {""}

    def save_logs(self, name: str) -> Path:
        """The container's output, in the report folder."""
        output = self.run("logs", name)
        path = self.logs / f"{name}.log"
        path.write_text(output.stdout + output.stderr)
        return path

    def remove_all(self) -> None:
        """Remove every container this object created, by name."""
        for name in reversed(self.created):
            self.run("rm", "--force", "--time", "0", name)
        self.created.clear()


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its descendants (uvicorn's workers, when WORKERS > 1)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        pending.extend(children.get(current, []))
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def wait_for_exit(podman: Podman, name: str, timeout: float) -> int | None:
    """The container's exit status once it stops, or None if it runs on past `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if podman.inspect(name, "{{.State.Running}}") == "false":
            return int(podman.inspect(name, "{{.State.ExitCode}}"))
        time.sleep(0.1)
    return None
