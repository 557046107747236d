"""URINGLOOP_EMULATE_KERNEL: the loop runs as it would on an older kernel.

The probe and the set-up ladder hide what the emulated release lacks (uringloop/_ring.py
has the table), so the loop takes that kernel's paths: 5.19 gets COOP_TASKRUN and
single-shot receives and copies every send; 6.0 adds SINGLE_ISSUER, multishot receives
from buffer rings and SEND_ZC (unused: no usage reports before 6.2); 6.1 adds
DEFER_TASKRUN; 6.2 zero-copy sends. Each case runs real TCP and UDP traffic in a child
process (tests/emulated_kernel_child.py) and checks which requests it used. CI also runs
the functional suite under the 5.19 and 6.1 masks (`make test-emulated`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def run(args: list[str], release: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, URINGLOOP_EMULATE_KERNEL=release)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def child(release: str) -> dict:
    proc = run([os.path.join(HERE, "emulated_kernel_child.py")], release)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# release: (set-up rung, multishot receives, zero-copy sends)
EXPECTED = {
    "5.19": ("COOP_TASKRUN|SUBMIT_ALL", False, False),
    "6.0": ("SINGLE_ISSUER|COOP_TASKRUN|SUBMIT_ALL", True, False),
    "6.1": ("SINGLE_ISSUER|DEFER_TASKRUN|SUBMIT_ALL", True, False),
    "6.2": ("SINGLE_ISSUER|DEFER_TASKRUN|SUBMIT_ALL", True, True),
}


@pytest.mark.parametrize("release", sorted(EXPECTED))
def test_the_loop_takes_the_paths_of_the_emulated_release(release):
    rung, multishot, zerocopy = EXPECTED[release]
    got = child(release)
    assert got["tcp_ok"] and got["udp_ok"]
    assert got["emulated_kernel"] == release
    assert got["setup"] == rung
    assert got["restricted"] is True  # restrictions came in 5.10
    assert got["multishot_accept"] is True  # 5.19
    assert got["recv_multishot"] is multishot
    assert (got["recv_multishot_cqes"] > 0) is multishot
    assert got["datagram"]["buffer_ring"] is multishot
    assert (got["datagram"]["recv_multishot_cqes"] > 0) is multishot
    assert (got["zc_sends"] > 0) is zerocopy
    assert (got["datagram"]["zc_sends"] > 0) is zerocopy


def test_info_says_what_the_emulation_leaves_out():
    proc = run(["-m", "uringloop", "info"], "5.19")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "emulating Linux 5.19" in out
    assert "leaves out set-up flags: SINGLE_ISSUER DEFER_TASKRUN" in out
    opcodes = next(line for line in out.splitlines() if "leaves out opcodes:" in line).split()
    assert "SEND_ZC" in opcodes and "SENDMSG_ZC" in opcodes and "SOCKET" not in opcodes
    assert "leaves out request features: send_zc recv_multishot send_zc_report_usage" in out
    assert "single-shot RECV" in out
    assert "zero-copy sends          no (copied sends)" in out
    assert "restricted               yes" in out


@pytest.mark.parametrize("value", ["5.4", "banana", "6"])
def test_a_release_the_loop_cannot_run_on_or_cannot_read_is_an_error(value):
    code = "import uringloop; uringloop.new_event_loop()"
    proc = run(["-c", code], value)
    assert proc.returncode == 1
    assert "ValueError: URINGLOOP_EMULATE_KERNEL=" in proc.stderr
    proc = run(["-m", "uringloop", "info"], value)
    assert proc.returncode == 2 and "URINGLOOP_EMULATE_KERNEL" in proc.stderr


def test_a_release_newer_than_the_kernel_hides_nothing():
    proc = run(["-m", "uringloop", "info"], "99.0")
    assert proc.returncode == 0, proc.stderr
    assert "emulating Linux 99.0" in proc.stdout and "leaves out" not in proc.stdout
