"""Container images without Docker or a registry: buildah builds, docker-archives, containerd imports.

What the real node (``devharness.node``) runs:

* ``registry.k8s.io/pause:3.10.1``: containerd's sandbox image, a static C
  program built here (nothing is pulled, so the name must match exactly);
* a Python base made locally (debootstrap minbase of Debian bookworm with
  python3 and pip), passed to the repository's own Dockerfile as its
  ``PYTHON_IMAGE`` build argument: the Dockerfile stays the one users build
  with Docker, only its base comes from here instead of Docker Hub;
* the project image, built with ``buildah bud`` from exactly the files the
  Dockerfile's context holds (``.dockerignore``), tagged with a digest of those
  files: a source change gives a new tag, so the node can never run a stale
  image under an old name;
* a Redis image from Debian's ``redis-server`` for the chart's bundled Redis
  (``redis.bundled.image``), since Docker Hub's is not reachable here.

Everything is cached under ``$KUBETRIAGE_CACHE/images`` (buildah's store, the
base root filesystem as a tar, the archives); warm, ``ensure_images()`` costs a
hash of the sources and a few ``buildah`` look-ups.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PAUSE_REF = "registry.k8s.io/pause:3.10.1"  # containerd 1.6's sandbox_image, set in the node's config
PROJECT_REPO = "localhost/kubetriage"
REDIS_REPO = "localhost/kubetriage-redis"
BASE_SUITE = "bookworm"
# python3-pip: the Dockerfile's stages run pip; ca-certificates: pip's TLS in the builder stage.
BASE_PACKAGES = ("python3", "python3-pip", "ca-certificates")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

PAUSE_C = r"""
/* Minimal pause: reap zombies, exit on SIGINT/SIGTERM (what registry.k8s.io/pause does). */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void die(int s) { (void)s; _exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction a = {0}, r = {0};
  a.sa_handler = die; sigaction(SIGINT, &a, NULL); sigaction(SIGTERM, &a, NULL);
  r.sa_handler = reap; r.sa_flags = SA_NOCLDSTOP; sigaction(SIGCHLD, &r, NULL);
  for (;;) pause();
}
"""

# Debian's redis-server on the local base. uid 999 / gid 1000 are the ids the chart's securityContext
# runs the bundled Redis as (those of the official image it defaults to).
REDIS_CONTAINERFILE = """\
ARG BASE
FROM ${BASE}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
USER 999:1000
ENTRYPOINT []
CMD ["redis-server"]
"""


class ImageError(RuntimeError):
    """An image could not be built; the message names the step."""


def log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = os.environ.get("KUBETRIAGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kubetriage")
    return Path(base)


@dataclass(frozen=True)
class Image:
    """An image in buildah's store and as a docker-archive that ``ctr images import`` takes."""

    ref: str
    archive: Path

    @property
    def repository(self) -> str:
        return self.ref.rsplit(":", 1)[0]

    @property
    def tag(self) -> str:
        return self.ref.rsplit(":", 1)[1]


class Builder:
    """buildah with a private store under the cache (never the machine's default store)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root() / "images"
        self.root.mkdir(parents=True, exist_ok=True)
        self.conf = self.root / "storage.conf"
        self.conf.write_text(
            '[storage]\ndriver = "overlay"\n'
            f'runroot = "{self.root / "store" / "run"}"\ngraphroot = "{self.root / "store" / "root"}"\n'
        )

    # ------------------------------------------------------------------ plumbing

    def env(self) -> dict[str, str]:
        # chroot isolation: no user namespaces or network namespaces needed; RUN steps use the host's network
        # (pip and apt reach their registries as the host does).
        return {**os.environ, "CONTAINERS_STORAGE_CONF": str(self.conf), "BUILDAH_ISOLATION": "chroot"}

    def buildah(self, *args: str, check: bool = True, quiet: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["buildah", *args], env=self.env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE if quiet else None)
        if check and result.returncode != 0:
            raise ImageError(f"buildah {' '.join(args[:3])} ... failed ({result.returncode}):\n"
                             f"{(result.stderr or '')[-3000:]}")
        return result

    def exists(self, ref: str) -> bool:
        return self.buildah("inspect", "--type", "image", ref, check=False).returncode == 0

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One build at a time per cache (two sessions would race on tags and archives)."""
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def archive(self, ref: str, name: str, tag_as: str | None = None) -> Image:
        """A docker-archive of ``ref`` (kept: the node imports it on a fresh containerd store)."""
        out = self.root / "archives" / f"{name}.tar"
        if not out.exists():
            out.parent.mkdir(exist_ok=True)
            tmp = out.with_suffix(".partial")
            tmp.unlink(missing_ok=True)
            self.buildah("push", "-q", ref, f"docker-archive:{tmp}:{tag_as or ref}")
            tmp.rename(out)
        return Image(tag_as or ref, out)

    def prune_archives(self, prefix: str, keep: Path, newest: int = 3) -> None:
        """Older archives of a changing image (each source change makes one) only take disk space; the
        newest few stay (the tests also use the image of an earlier commit)."""
        keep.touch()
        old = sorted((self.root / "archives").glob(f"{prefix}-*.tar"), key=lambda p: p.stat().st_mtime,
                     reverse=True)
        for path in old[newest:]:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ images

    def pause(self) -> Image:
        src = PAUSE_C.encode()
        digest = hashlib.sha256(src).hexdigest()[:12]
        local = f"localhost/kubetriage-pause:{digest}"
        if not self.exists(local):
            log("building the pause image (static C, for containerd's sandboxes)")
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "pause.c").write_bytes(src)
                subprocess.run(["gcc", "-Os", "-static", "-o", "pause", "pause.c"], cwd=tmp, check=True)
                subprocess.run(["strip", "pause"], cwd=tmp, check=True)
                c = self.buildah("from", "scratch").stdout.strip()
                self.buildah("copy", c, str(Path(tmp) / "pause"), "/pause")
                self.buildah("config", "--entrypoint", '["/pause"]', "--user", "65535:65535", c)
                self.buildah("commit", "-q", "--rm", c, local)
        return self.archive(local, f"pause-{digest}", tag_as=PAUSE_REF)

    def base_rootfs(self) -> Path:
        """debootstrap minbase + python3 + pip, once, kept as a tar (about 1.5 min cold)."""
        tar = self.root / f"rootfs-{BASE_SUITE}-py3.tar"
        if tar.exists():
            return tar
        if not shutil.which("debootstrap"):
            raise ImageError("debootstrap not found: install the Debian package 'debootstrap' (hack/node.sh packages)")
        log(f"making the Python base: debootstrap {BASE_SUITE} minbase + {', '.join(BASE_PACKAGES)} (once)")
        t0 = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=self.root))
        try:
            r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                                BASE_SUITE, str(work), debian_mirror()], capture_output=True, text=True)
            if r.returncode != 0:
                raise ImageError(f"debootstrap failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
            # The image is a Python runtime like python:*-slim: pip may install system-wide (the Dockerfile does),
            # `python` exists, and no apt lists or docs are carried along.
            for p in (work / "usr" / "lib").glob("python3*/EXTERNALLY-MANAGED"):
                p.unlink()
            (work / "usr" / "bin" / "python").symlink_to("python3")
            for d in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                      "usr/share/locale"):
                for child in (work / d).glob("*"):
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    elif child.name != "lock":
                        child.unlink(missing_ok=True)
            subprocess.run(["tar", "-C", str(work), "-cf", str(tar.with_suffix(".partial")), "."], check=True)
            tar.with_suffix(".partial").rename(tar)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f"Python base root filesystem made in {time.monotonic() - t0:.0f}s")
        return tar

    def base(self) -> str:
        tar = self.base_rootfs()
        digest = file_digest(tar)[:12]
        ref = f"localhost/kubetriage-python-base:{BASE_SUITE}-{digest}"
        if not self.exists(ref):
            log(f"importing the Python base as {ref}")
            c = self.buildah("from", "scratch").stdout.strip()
            mnt = self.buildah("mount", c).stdout.strip()
            subprocess.run(["tar", "-C", mnt, "-xpf", str(tar)], check=True)
            self.buildah("umount", c)
            self.buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                         "--env", "LANG=C.UTF-8", "--cmd", '["python3"]', c)
            self.buildah("commit", "-q", "--rm", c, ref)
        return ref

    def bud(self, context: Path, ref: str, build_args: dict[str, str], containerfile: Path | None = None,
            layers: bool = True) -> None:
        args = ["bud", f"--layers={str(layers).lower()}", "-q", "-t", ref]
        if HOST_CA_BUNDLE.exists():
            # PyPI may sit behind a TLS-intercepting proxy only the host trusts: lend RUN steps the host's
            # CA bundle through a read-only bind mount (nothing of it lands in a layer).
            args += ["-v", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
        for key, value in build_args.items():
            args += ["--build-arg", f"{key}={value}"]
        if containerfile:
            args += ["-f", str(containerfile)]
        self.buildah(*args, str(context), quiet=False)

    def project(self, repo: Path = REPO_ROOT) -> Image:
        """The repository's Dockerfile on the local base, tagged ``src-<digest of the build context>``."""
        base = self.base()
        with tempfile.TemporaryDirectory(prefix="kt-context-") as tmp:
            ctx = Path(tmp)
            digest = copy_context(repo, ctx, extra=base)
            ref = f"{PROJECT_REPO}:src-{digest[:16]}"
            if not self.exists(ref):
                log(f"building {ref} from {repo / 'Dockerfile'} (base {base})")
                t0 = time.monotonic()
                # No layer cache: buildah 1.28 reuses the final stage's `RUN --mount=...,from=builder` layer
                # when only the builder's output changed, which would ship stale code under a new tag.
                self.bud(ctx, ref, {"PYTHON_IMAGE": base, "VERSION": project_version(repo),
                                    "REVISION": f"src-{digest[:16]}"}, layers=False)
                log(f"built {ref} in {time.monotonic() - t0:.0f}s")
        image = self.archive(ref, f"kubetriage-{digest[:16]}")
        self.prune_archives("kubetriage", image.archive)
        return image

    def redis(self) -> Image:
        base = self.base()
        digest = hashlib.sha256((base + REDIS_CONTAINERFILE).encode()).hexdigest()[:12]
        ref = f"{REDIS_REPO}:{BASE_SUITE}-{digest}"
        if not self.exists(ref):
            log(f"building {ref} from Debian's redis-server")
            with tempfile.TemporaryDirectory(prefix="kt-redis-") as tmp:
                (Path(tmp) / "Containerfile").write_text(REDIS_CONTAINERFILE)
                self.bud(Path(tmp), ref, {"BASE": base}, Path(tmp) / "Containerfile")
        return self.archive(ref, f"redis-{digest}")


@dataclass(frozen=True)
class NodeImages:
    pause: Image
    project: Image
    redis: Image

    def all(self) -> list[Image]:
        return [self.pause, self.project, self.redis]


def ensure_images(repo: Path = REPO_ROOT) -> NodeImages:
    builder = Builder()
    t0 = time.monotonic()
    with builder.locked():
        images = NodeImages(builder.pause(), builder.project(repo), builder.redis())
    log(f"images ready in {time.monotonic() - t0:.1f}s: {images.project.ref}, {images.redis.ref}")
    return images


# --------------------------------------------------------------------------- helpers


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def debian_mirror() -> str:
    """The mirror this machine's apt uses (debootstrap must go where apt may go)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for src in sources:
        with contextlib.suppress(OSError):
            text = src.read_text()
            for m in re.finditer(r"(?m)^(?:URIs:|deb)\s+(?:\[[^\]]*\]\s+)?(https?://\S+)", text):
                if "security" not in m.group(1):
                    return m.group(1)
    return "http://deb.debian.org/debian"


def project_version(repo: Path) -> str:
    m = re.search(r'(?m)^version\s*=\s*"([^"]+)"', (repo / "pyproject.toml").read_text())
    return m.group(1) if m else "0.0.0"


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes; a matched directory covers its files."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pat[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(c, pat) for c in candidates)
        if hit:
            excluded = not negate
    return excluded


def copy_context(repo: Path, dest: Path, extra: str = "") -> str:
    """Copy what `docker build` would send (per .dockerignore) plus the Dockerfile; return their digest.

    Hashing the copy, not the tree, means the tag names exactly the bytes built, even while someone edits
    the repository during the build."""
    ignore = repo / ".dockerignore"
    patterns = [ln.strip() for ln in ignore.read_text().splitlines()
                if ln.strip() and not ln.startswith("#")] if ignore.exists() else []
    h = hashlib.sha256(extra.encode())
    files = sorted(p for p in repo.rglob("*") if p.is_file() and not p.relative_to(repo).as_posix().startswith(".git/"))
    for path in files:
        rel = path.relative_to(repo).as_posix()
        if rel != "Dockerfile" and _dockerignored(rel, patterns):
            continue
        data = path.read_bytes()
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(path.stat().st_mode & 0o777)
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m devharness.images",
                                     description="Build the node's images with buildah (cached).")
    parser.add_argument("what", choices=["all", "project", "base"], nargs="?", default="all")
    args = parser.parse_args(argv)
    b = Builder()
    with b.locked():
        if args.what == "base":
            print(b.base())
        elif args.what == "project":
            print(b.project().ref)
        else:
            for image in (b.pause(), b.project(), b.redis()):
                print(image.ref, image.archive)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
