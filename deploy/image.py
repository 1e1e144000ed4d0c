"""`make image`: build the Dockerfile into $IMAGE with podman, or with docker where only it is.

The Dockerfile is the one users build; what this adds is only what a machine without a registry
or with an intercepting proxy needs, and none of it reaches the image:

- The base, `debian:trixie-slim`, is pulled if it is not there. Where no registry answers, it is
  made from Debian's packages as the official one is (mmdebstrap, variant minbase, without
  documentation, man pages and translations) and stored under the official name, so the
  Dockerfile's `FROM` finds it and a machine that can pull gets the real one unchanged.
- podman runs with a containers.conf of its own (CONTAINERS_CONF, unless one is set): the runc
  runtime where it is installed (crun refuses hybrid cgroup hierarchies), and no default
  rlimits (containers that may not set them cannot start otherwise).
- RUN steps use the host's network, and pip in them the machine's own index settings (index-url,
  extra-index-url and cert from `pip config list` and PIP_*; local file indexes and find-links
  are left out): a pip.conf and the CA bundle it names are mounted read-only over /root, a
  folder the base already has, so no mount point is left behind in any layer.

Environment: IMAGE (registry.example.com/playing-with-neon-service:dev), CONTAINER_ENGINE (podman
or docker; the first found). Exit status: 0 built, 1 the build failed, 2 nothing to build with.
"""

# Commands built from constants and this machine's own tools: nothing untrusted reaches a shell.
# ruff: noqa: S603, S607

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = "registry.example.com/playing-with-neon-service:dev"
# The Dockerfile's base, and its fully qualified name: podman resolves the short one to it, and a
# base made here is stored under it so that `FROM debian:trixie-slim` finds it without pulling.
BASE = "debian:trixie-slim"
BASE_REFERENCE = "docker.io/library/debian:trixie-slim"
SUITE = "trixie"
# What Debian's own slim images leave out (debuerreotype's slimify list): dpkg is told so once,
# in the base, and every package installed on it later skips these paths too.
SLIM_EXCLUDES = [
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/linda/*",
    "path-exclude=/usr/share/lintian/overrides/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/man/*",
]
# The pip settings a build may take from this machine; a file:// index or find-links names a
# folder of this machine, which the build cannot see.
PIP_KEYS = ("index-url", "extra-index-url", "cert")
BUILD_SECONDS = 900
BASE_SECONDS = 300


class ImageError(Exception):
    """The image could not be built (the message says why)."""


def cache_dir() -> Path:
    """Where the generated containers.conf and a made base's tarball live between runs."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = cache / "playing-with-neon" / "image"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def engine() -> str:
    """podman, else docker, unless CONTAINER_ENGINE names one."""
    named = os.environ.get("CONTAINER_ENGINE", "").strip()
    for candidate in [named] if named else ["podman", "docker"]:
        if shutil.which(candidate):
            return candidate
    raise ImageError(
        f"no container engine: {named or 'podman or docker'} not found "
        "(Debian: apt-get install podman buildah runc)"
    )


def engine_environment(program: str) -> dict[str, str]:
    """The environment to run `program` in; for podman, with CONTAINERS_CONF set."""
    env = dict(os.environ)
    if program != "podman" or env.get("CONTAINERS_CONF"):
        return env
    lines = ["[containers]", "default_ulimits = []"]
    if shutil.which("runc"):
        lines += ["", "[engine]", 'runtime = "runc"']
    conf = cache_dir() / "containers.conf"
    conf.write_text("\n".join(lines) + "\n")
    env["CONTAINERS_CONF"] = str(conf)
    return env


def machine_pip_settings() -> dict[str, str]:
    """The index-url, extra-index-url and cert pip uses here, http(s) indexes only.

    `pip config list` shows the config files and the PIP_* variables (as `:env:.key`); a
    variable wins over a file, as in pip itself.
    """
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    files: dict[str, str] = {}
    variables: dict[str, str] = {}
    for line in listed.splitlines():
        match = re.fullmatch(r"(?P<section>[^.]*)\.(?P<key>[\w-]+)='(?P<value>.*)'", line.strip())
        if not match or match["key"] not in PIP_KEYS:
            continue
        target = variables if match["section"] == ":env:" else files
        if match["section"] in (":env:", "global", "install", "download"):
            target.setdefault(match["key"], match["value"])
    settings = {**files, **variables}
    for key in ("index-url", "extra-index-url"):
        urls = [url for url in settings.get(key, "").split() if re.match(r"https?://", url)]
        if urls:
            settings[key] = " ".join(urls)
        else:
            settings.pop(key, None)
    if "cert" in settings and not Path(settings["cert"]).is_file():
        del settings["cert"]
    return settings


def build_home(folder: Path) -> Path | None:
    """A /root for the build's RUN steps holding pip.conf (and the CA bundle it names), or None
    when pip needs nothing from this machine."""
    settings = machine_pip_settings()
    if not settings:
        return None
    home = folder / "root"
    (home / ".config" / "pip").mkdir(parents=True)
    if "cert" in settings:
        shutil.copyfile(settings["cert"], home / "ca-bundle.pem")
        settings["cert"] = "/root/ca-bundle.pem"
    lines = ["[global]", *(f"{key} = {value}" for key, value in settings.items())]
    (home / ".config" / "pip" / "pip.conf").write_text("\n".join(lines) + "\n")
    return home


def image_exists(program: str, env: dict[str, str], name: str) -> bool:
    """Whether the engine has `name` locally."""
    command = [program, "image", "inspect", name]
    found = subprocess.run(command, env=env, capture_output=True, timeout=60, check=False)
    return found.returncode == 0


def make_base(program: str, env: dict[str, str]) -> None:
    """debian:trixie-slim from Debian's packages (mmdebstrap), imported under its official name."""
    if not shutil.which("mmdebstrap"):
        raise ImageError(
            f"{BASE} cannot be pulled and mmdebstrap is not installed to make it "
            "(Debian: apt-get install mmdebstrap)"
        )
    tarball = cache_dir() / f"debian-{SUITE}-slim.tar"
    print(f"==> making {BASE} with mmdebstrap instead (about 20 s)", flush=True)
    options = [f"--dpkgopt={option}" for option in SLIM_EXCLUDES]
    subprocess.run(
        ["mmdebstrap", "--variant=minbase", "--quiet", *options, SUITE, str(tarball)],
        timeout=BASE_SECONDS,
        check=True,
    )
    made = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    description = f"mmdebstrap --variant=minbase {SUITE}, made locally"
    command = [
        program, "import",
        "--change", 'CMD ["bash"]',
        "--change", f"LABEL org.opencontainers.image.created={made}",
        "--change", f'LABEL org.opencontainers.image.description="{description}"',
        str(tarball), BASE_REFERENCE,
    ]  # fmt: skip
    subprocess.run(
        command,
        env=env,
        capture_output=True,
        timeout=BASE_SECONDS,
        check=True,
    )
    tarball.unlink()


def ensure_base(program: str, env: dict[str, str]) -> str:
    """Have the base image locally; returns where it came from."""
    if image_exists(program, env, BASE_REFERENCE):
        return "present"
    pulled = subprocess.run(
        [program, "pull", BASE_REFERENCE],
        env=env,
        capture_output=True,
        text=True,
        timeout=BASE_SECONDS,
        check=False,
    )
    if pulled.returncode == 0:
        return "pulled"
    reason = pulled.stderr.strip().splitlines()[-1:] or [f"exit status {pulled.returncode}"]
    print(f"==> pull {BASE_REFERENCE}: {reason[0]}", flush=True)
    make_base(program, env)
    return "made from Debian's packages"


def build(image: str) -> tuple[str, dict[str, str]]:
    """Build the Dockerfile into `image`; returns the engine and the environment it ran in."""
    program = engine()
    env = engine_environment(program)
    if program == "docker":
        subprocess.run(
            ["docker", "build", "-t", image, str(ROOT)], timeout=BUILD_SECONDS, check=True
        )
        return program, env
    print(f"==> base {BASE}: {ensure_base(program, env)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="image-build-") as folder:
        command = [
            "podman", "build",
            # HEALTHCHECK is a Docker image field; OCI images have none.
            "--format", "docker",
            "--network", "host",
            "--pull=never",
            "-t", image,
        ]  # fmt: skip
        home = build_home(Path(folder))
        if home is not None:
            command += ["-v", f"{home}:/root:ro"]
        print(f"==> building {image}", flush=True)
        subprocess.run([*command, str(ROOT)], env=env, timeout=BUILD_SECONDS, check=True)
    return program, env


def main() -> int:
    """`make image`."""
    image = os.environ.get("IMAGE", "").strip() or DEFAULT_IMAGE
    try:
        build(image)
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"error: the image build failed: {exc}", file=sys.stderr)
        return 1
    print(f"built {image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
