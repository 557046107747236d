"""The wheel works where liburing and a compiler do not exist; the sdist says what it needs.

The module builds the wheel for the running interpreter as `make wheels` does
(native/wheels.py: liburing linked in, auditwheel's manylinux check and tag), installs
it into a fresh venv, and runs everything else in a private mount namespace
(`unshare --mount`) where liburing's shared library, archive, headers and pkg-config file,
and the C compilers and linker, are covered by /dev/null or an empty tmpfs. There the
example echo server serves a real client and a slice of this suite (the ring's tests and
the servers') passes on the installed wheel, while the sdist, built the same way, stops
with the one sentence that names the missing package.

Needs root for the mount namespace (CI runs as root) and PyPI for the venv's packages.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
from conftest import ROOT, free_port

LIBURING_FILES = (
    "/usr/include/liburing.h",
    "/usr/include/liburing",
    "/usr/lib/*/liburing.so*",
    "/usr/lib/*/liburing.a",
    "/usr/lib/*/pkgconfig/liburing.pc",
    "/usr/local/include/liburing*",
    "/usr/local/lib/liburing*",
)
COMPILERS = (
    "/usr/bin/cc",
    "/usr/bin/c++",
    "/usr/bin/gcc*",
    "/usr/bin/g++*",
    "/usr/bin/*-linux-gnu-gcc*",
    "/usr/bin/*-linux-gnu-g++*",
    "/usr/bin/clang*",
    "/usr/bin/ld",
    "/usr/bin/ld.bfd",
    "/usr/bin/ld.gold",
    "/usr/bin/*-linux-gnu-ld",
    "/usr/bin/*-linux-gnu-ld.bfd",
    "/usr/bin/*-linux-gnu-ld.gold",
)  # (not /usr/bin/ld.so: that is the dynamic loader)
# the suite's slice run from the installed wheel: the ring's own tests and the servers'
SLICE = ("test_ring.py", "test_servers.py")

# covers each existing path of the patterns given as arguments, then runs what follows "--"
HIDE = textwrap.dedent(
    """\
    set -eu
    while [ "$1" != "--" ]; do
        for f in $1; do
            if [ -d "$f" ] && [ ! -L "$f" ]; then mount -t tmpfs -o ro,size=4k none "$f"
            elif [ -e "$f" ]; then mount --bind /dev/null "$f"
            fi
        done
        shift
    done
    shift
    exec "$@"
    """
)


def hidden(argv: list[str], *patterns: str, timeout: float = 300, **kwargs):
    """Runs argv in a new mount namespace where the paths matching patterns do not work."""
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", HIDE, "sh"]
        + [*patterns, "--", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def build(python: str, dist, *args: str) -> None:
    """native/wheels.py (what `make wheels` runs) for one interpreter, into dist."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "native", "wheels.py"), "--python", python]
        + ["--out", str(dist), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def venv_with(python: str, venv, *packages: str):
    """A fresh venv of python with packages (paths or requirements) installed."""
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    proc = subprocess.run(
        [*pip, "--disable-pip-version-check", *packages],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the wheel, the sdist, a fresh venv with the wheel installed)."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is missing")
    probe = hidden(["true"], "/nonexistent")
    if probe.returncode != 0:
        pytest.fail(f"no private mount namespace here (needs root): {probe.stderr.strip()}")
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    build(sys.executable, dist)
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    packages = ("pytest>=8", "pytest-asyncio>=1.5", "uvloop")
    venv = venv_with(sys.executable, tmp / "venv", str(wheel), *packages)
    return wheel, sdist, venv


def test_wheel_is_manylinux_and_carries_liburing_inside(built):
    wheel, _, _ = built
    tag = sys.implementation.cache_tag.replace("cpython-", "cp")
    assert f"-{tag}-{tag}-" in wheel.name and "manylinux_2_17" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        # no liburing.so bundled beside the extensions: it is linked in
        assert not [n for n in names if "liburing" in n and n.endswith((".so", ".so.2"))], names
        assert any(n.endswith("licenses/native/LICENSE.liburing") for n in names), names
        extensions = [n for n in names if n.endswith(".so")]
        assert {os.path.basename(n).split(".")[0] for n in extensions} == {"_dataplane", "_uring"}
        tmp = wheel.parent / "unpacked"
        zf.extractall(tmp, extensions)
    for ext in extensions:
        path = str(tmp / ext)
        needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
        assert "liburing" not in needed, needed
        # liburing's symbols stay private to each extension (--exclude-libs)
        exported = subprocess.run(
            ["nm", "-D", "--defined-only", path], capture_output=True, text=True, check=True
        ).stdout
        assert "io_uring_queue_init" not in exported, exported


def test_installed_wheel_runs_with_liburing_and_compilers_hidden(built):
    _, _, venv = built
    python = str(venv / "bin" / "python")
    check = textwrap.dedent(
        """\
        import asyncio, ctypes, json, os, shutil, uringloop
        try:
            ctypes.CDLL("liburing.so.2")
            found = True
        except OSError:
            found = False
        cc = shutil.which("cc")
        loop = uringloop.new_event_loop()
        try:
            ring = loop.ring_info()
            loop.run_until_complete(asyncio.sleep(0.01))
        finally:
            loop.close()
        print(json.dumps({"file": uringloop.__file__, "liburing": found,
                          "cc": bool(cc and os.access(cc, os.X_OK)), "setup": ring["setup"]}))
        """
    )
    proc = hidden([python, "-c", check], *LIBURING_FILES, *COMPILERS, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    seen = json.loads(proc.stdout.splitlines()[-1])
    assert seen["file"].startswith(str(venv)), seen  # the wheel, not the source tree
    assert seen["liburing"] is False and not seen["cc"], seen  # really hidden
    assert seen["setup"], seen
    # what `python -m uringloop info` says there
    proc = hidden([python, "-m", "uringloop", "info"], *LIBURING_FILES, *COMPILERS, cwd="/")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_example_echo_server_from_the_wheel_serves_a_client(built, tmp_path):
    _, _, venv = built
    port = free_port()
    script = shutil.copy(os.path.join(ROOT, "examples", "echo_server.py"), tmp_path)
    argv = [str(venv / "bin" / "python"), script, "--port", str(port)]
    server = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", HIDE, "sh"]
        + [*LIBURING_FILES, *COMPILERS, "--", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        line = server.stdout.readline()
        assert "on UringEventLoop listening on" in line, line + server.stderr.read()
        payload = os.urandom(1 << 20)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = bytearray()
            deadline = time.monotonic() + 20
            while len(got) < len(payload) and time.monotonic() < deadline:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                got += chunk
        assert bytes(got) == payload
    finally:
        server.terminate()
        server.wait(10)
        server.stdout.close()
        server.stderr.close()


def test_suite_slice_passes_on_the_installed_wheel(built, tmp_path):
    _, _, venv = built
    suite = tmp_path / "suite"
    shutil.copytree(
        os.path.join(ROOT, "tests"), suite / "tests", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), suite)  # pytest's settings
    argv = [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    argv += ["-k", "uringloop or not (asyncio or uvloop)", *(f"tests/{t}" for t in SLICE)]
    proc = hidden(argv, *LIBURING_FILES, *COMPILERS, cwd=suite, timeout=600)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


def oldest_supported_python() -> str:
    """CPython 3.10 (pyenv's build or python3.10 on PATH), as `make wheels` finds it."""
    for path in [*sorted(glob.glob("/root/.pyenv/versions/3.10*/bin/python3")), "python3.10"]:
        path = shutil.which(path) or ""
        if (
            path
            and subprocess.run(
                [path, "-c", "import sys; assert sys.version_info[:2] == (3, 10)"]
            ).returncode
            == 0
        ):
            return path
    pytest.fail("no CPython 3.10 here (make wheels builds for 3.10 to 3.13)")


def test_wheel_for_python_3_10_runs_tasks_timers_and_streams(tmp_path):
    """The oldest supported CPython, whose asyncio differs most (its Task takes no
    context): its wheel, installed and run with liburing and the compilers hidden."""
    python = oldest_supported_python()
    dist = tmp_path / "dist"
    build(python, dist, "--no-sdist")
    (wheel,) = dist.glob("*-cp310-*.whl")
    venv = venv_with(python, tmp_path / "venv", str(wheel))
    script = textwrap.dedent(
        """        import asyncio, contextvars, uringloop
        var = contextvars.ContextVar("var", default="unset")

        async def child(i):
            await asyncio.sleep(0.001 * (i % 3))
            return i, var.get()

        async def main():
            loop = asyncio.get_running_loop()
            assert type(loop).__name__ == "UringEventLoop", loop
            var.set("main")
            tasks = [loop.create_task(child(i), name=f"c{i}") for i in range(50)]
            got = await asyncio.gather(*tasks)
            assert got == [(i, "main") for i in range(50)], got
            assert tasks[7].get_name() == "c7"
            try:
                loop.create_task(child(0), context=contextvars.copy_context())
            except TypeError as exc:  # as asyncio's loop on 3.10
                print("context=:", exc)
            else:
                raise AssertionError("3.10's create_task took context=")
            fired = loop.create_future()
            loop.call_later(0.01, fired.set_result, "timer")
            assert await fired == "timer"
            server = await asyncio.start_server(echo, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x" * 300_000)
            data = await reader.readexactly(300_000)
            writer.close()
            server.close()
            await server.wait_closed()
            print("ok", len(data), loop.ring_info()["setup"])

        async def echo(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
            writer.close()

        uringloop.run(main())
        """
    )
    (tmp_path / "check.py").write_text(script)
    argv = [str(venv / "bin" / "python"), str(tmp_path / "check.py")]
    proc = hidden(argv, *LIBURING_FILES, *COMPILERS, cwd="/")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "\nok 300000 " in "\n" + proc.stdout, proc.stdout


def test_sdist_without_liburing_stops_with_one_sentence(built, tmp_path):
    """The compiler is there, liburing is not: the build names the package to install."""
    _, sdist, venv = built
    argv = [str(venv / "bin" / "python"), "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path)]
    proc = hidden([*argv, str(sdist)], *LIBURING_FILES, cwd=tmp_path, timeout=600)
    assert proc.returncode != 0, proc.stdout[-2000:]
    out = proc.stdout + proc.stderr
    assert "uringloop needs liburing's headers and library to build" in out, out[-3000:]
    assert "apt-get install liburing-dev" in out, out[-3000:]
    assert not glob.glob(str(tmp_path / "*.whl"))
