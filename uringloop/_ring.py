"""Control plane: ring set-up with flag fallback, feature probing, availability errors.

Facts this module relies on (see shared/notes/kernel-facts.md for sources):

- ``io_uring_setup`` fails with ENOSYS on kernels without io_uring and under seccomp
  profiles that hide it, with EPERM when ``kernel.io_uring_disabled`` forbids it (or a
  seccomp filter says so), and EACCES/EOPNOTSUPP in some managed sandboxes. liburing
  returns ``-errno`` rather than setting errno.
- Set-up flags for a single-threaded loop, newest first: SINGLE_ISSUER (6.0) with
  DEFER_TASKRUN (6.1), else COOP_TASKRUN (5.19), plus SUBMIT_ALL (5.18) and CQSIZE.
  A kernel that does not know a flag answers EINVAL, so we step down one rung at a time.
- TASKRUN_FLAG (5.19, with COOP_TASKRUN or DEFER_TASKRUN) makes the kernel set
  IORING_SQ_TASKRUN in the SQ ring's flags whenever completion work waits for us. An
  iteration that must not sleep, has nothing to submit, and sees neither that flag nor
  CQ_OVERFLOW would get nothing from io_uring_enter, so the data plane skips the call.
- SINGLE_ISSUER binds the ring to one task; a ring created with R_DISABLED binds to
  the task that enables it, which the data plane does in the loop's first wait().
- Opcodes are probed with IORING_REGISTER_PROBE; request flags the probe cannot see
  (SEND_ZC usage reports, multishot recv, provided buffer rings, multishot accept) are
  tried once per process on a throwaway ring.
- IORING_REGISTER_RESTRICTIONS (5.10) is accepted only while the ring is still disabled
  (R_DISABLED, also 5.10, on every rung) and takes effect when it is enabled: from then
  on a request with an opcode or SQE flag outside the list completes with -EACCES and a
  register operation outside it fails with EACCES. It narrows what a process that gets
  hold of the ring fd, or a bug of ours, can ask of the kernel through this ring; it does
  not make the kernel's own io_uring code any safer, and other rings of the process are
  not affected.
- Without CAP_IPC_LOCK the ring's own memory (SQEs, CQEs) is charged to RLIMIT_MEMLOCK
  (a 1,024/8,192-entry ring: ~200 KiB; 64 KiB was the default limit before 5.16), and
  io_uring_setup answers ENOMEM above it. The charge of a ring just closed is released
  asynchronously (by a kernel worker), so a ring made right after another one closed
  may be refused for a few milliseconds: set-up waits that out, then halves the ring
  until it fits (a smaller ring only submits and reaps more often).
- URINGLOOP_EMULATE_KERNEL=X.Y makes the probe and the set-up ladder pretend the kernel
  is release X.Y: every feature newer than that (table below) is reported missing, so
  the loop takes the paths it would take there. It hides features, it cannot add any.
"""

from __future__ import annotations

import errno
import functools
import os
import platform
import time
from dataclasses import dataclass, field

from . import _uring

ffi = _uring.ffi
lib = _uring.lib

SQ_ENTRIES = 1024
# Two CQEs per zero-copy send and a multishot stream per socket: keep the CQ roomy,
# since multishot requests end when the CQ overflows.
CQ_ENTRIES = 8 * SQ_ENTRIES


def _cq_entries(sq_entries: int) -> int:
    """The CQ size: URINGLOOP_CQ_ENTRIES (a power of two) sets a smaller one, for tests
    that overflow it on purpose (the SQ is then no larger)."""
    value = os.environ.get("URINGLOOP_CQ_ENTRIES")
    if not value:
        return max(CQ_ENTRIES, sq_entries * 2)
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 8 or n & (n - 1):
        raise ValueError(f"URINGLOOP_CQ_ENTRIES={value!r}: a power of two of at least 8")
    return n


# Kernel ABI opcode numbers (include/uapi/linux/io_uring.h); names past the end of
# this table are printed by number.
OPCODE_NAMES = (
    "NOP READV WRITEV FSYNC READ_FIXED WRITE_FIXED POLL_ADD POLL_REMOVE SYNC_FILE_RANGE "
    "SENDMSG RECVMSG TIMEOUT TIMEOUT_REMOVE ACCEPT ASYNC_CANCEL LINK_TIMEOUT CONNECT "
    "FALLOCATE OPENAT CLOSE FILES_UPDATE STATX READ WRITE FADVISE MADVISE SEND RECV "
    "OPENAT2 EPOLL_CTL SPLICE PROVIDE_BUFFERS REMOVE_BUFFERS TEE SHUTDOWN RENAMEAT "
    "UNLINKAT MKDIRAT SYMLINKAT LINKAT MSG_RING FSETXATTR SETXATTR FGETXATTR GETXATTR "
    "SOCKET URING_CMD SEND_ZC SENDMSG_ZC READ_MULTISHOT WAITID FUTEX_WAIT FUTEX_WAKE "
    "FUTEX_WAITV FIXED_FD_INSTALL FTRUNCATE BIND LISTEN RECV_ZC EPOLL_WAIT READV_FIXED "
    "WRITEV_FIXED PIPE"
).split()
OP = {name: number for number, name in enumerate(OPCODE_NAMES)}

# The rungs tried in order. Each is (name, flags); CQSIZE is added to all.
SETUP_LADDER: tuple[tuple[str, int], ...] = (
    (
        "SINGLE_ISSUER|DEFER_TASKRUN|SUBMIT_ALL",
        lib.IORING_SETUP_SINGLE_ISSUER
        | lib.IORING_SETUP_DEFER_TASKRUN
        | lib.IORING_SETUP_TASKRUN_FLAG
        | lib.IORING_SETUP_SUBMIT_ALL
        | lib.IORING_SETUP_R_DISABLED,
    ),
    (
        "SINGLE_ISSUER|COOP_TASKRUN|SUBMIT_ALL",
        lib.IORING_SETUP_SINGLE_ISSUER
        | lib.IORING_SETUP_COOP_TASKRUN
        | lib.IORING_SETUP_TASKRUN_FLAG
        | lib.IORING_SETUP_SUBMIT_ALL
        | lib.IORING_SETUP_R_DISABLED,
    ),
    (
        "COOP_TASKRUN|SUBMIT_ALL",
        lib.IORING_SETUP_COOP_TASKRUN
        | lib.IORING_SETUP_TASKRUN_FLAG
        | lib.IORING_SETUP_SUBMIT_ALL
        | lib.IORING_SETUP_R_DISABLED,
    ),
    ("SUBMIT_ALL", lib.IORING_SETUP_SUBMIT_ALL | lib.IORING_SETUP_R_DISABLED),
    ("plain", lib.IORING_SETUP_R_DISABLED),
)

SETUP_FLAG_NAMES = {
    "CQSIZE": lib.IORING_SETUP_CQSIZE,
    "SUBMIT_ALL": lib.IORING_SETUP_SUBMIT_ALL,
    "COOP_TASKRUN": lib.IORING_SETUP_COOP_TASKRUN,
    "TASKRUN_FLAG": lib.IORING_SETUP_TASKRUN_FLAG,
    "SINGLE_ISSUER": lib.IORING_SETUP_SINGLE_ISSUER,
    "DEFER_TASKRUN": lib.IORING_SETUP_DEFER_TASKRUN,
    "R_DISABLED": lib.IORING_SETUP_R_DISABLED,
}

FEATURE_NAMES = {
    "SINGLE_MMAP": lib.IORING_FEAT_SINGLE_MMAP,
    "NODROP": lib.IORING_FEAT_NODROP,
    "SUBMIT_STABLE": lib.IORING_FEAT_SUBMIT_STABLE,
    "FAST_POLL": lib.IORING_FEAT_FAST_POLL,
    "EXT_ARG": lib.IORING_FEAT_EXT_ARG,
    "NATIVE_WORKERS": lib.IORING_FEAT_NATIVE_WORKERS,
    "CQE_SKIP": lib.IORING_FEAT_CQE_SKIP,
    "LINKED_FILE": lib.IORING_FEAT_LINKED_FILE,
    # (newer than the liburing headers this may be built against: the kernel's value)
    "RECVSEND_BUNDLE": getattr(lib, "IORING_FEAT_RECVSEND_BUNDLE", 1 << 14),
}


# --------------------------------------------------------------- older kernels, emulated
# The first release with each io_uring feature the loop uses or reports (the kernel's
# history of include/uapi/linux/io_uring.h; the io_uring_setup(2), io_uring_enter(2)
# and io_uring_register(2) man pages say "since Linux X.Y").
OLDEST_EMULATED_KERNEL = (5, 19)  # the oldest release the loop supports (cancel by fd)

SETUP_FLAG_SINCE: dict[str, tuple[int, int]] = {
    "CQSIZE": (5, 5),
    "CLAMP": (5, 6),
    "R_DISABLED": (5, 10),
    "SUBMIT_ALL": (5, 18),
    "COOP_TASKRUN": (5, 19),
    "TASKRUN_FLAG": (5, 19),
    "SINGLE_ISSUER": (6, 0),
    "DEFER_TASKRUN": (6, 1),
}
RING_FEATURE_SINCE: dict[str, tuple[int, int]] = {
    "SINGLE_MMAP": (5, 4),
    "NODROP": (5, 5),
    "SUBMIT_STABLE": (5, 5),
    "FAST_POLL": (5, 7),
    "EXT_ARG": (5, 11),
    "NATIVE_WORKERS": (5, 12),
    "CQE_SKIP": (5, 17),
    "LINKED_FILE": (5, 17),
    "RECVSEND_BUNDLE": (6, 10),
}
# request features found by trial, and restrictions
REQUEST_FEATURE_SINCE: dict[str, tuple[int, int]] = {
    "registered_buffers": (5, 1),
    "restrictions": (5, 10),
    "multishot_accept": (5, 19),
    "provided_buffer_rings": (5, 19),
    "send_zc": (6, 0),
    "recv_multishot": (6, 0),
    "send_zc_report_usage": (6, 2),
}
_OPCODES_BY_RELEASE = {
    (5, 1): "NOP READV WRITEV FSYNC READ_FIXED WRITE_FIXED POLL_ADD POLL_REMOVE",
    (5, 2): "SYNC_FILE_RANGE",
    (5, 3): "SENDMSG RECVMSG",
    (5, 4): "TIMEOUT",
    (5, 5): "TIMEOUT_REMOVE ACCEPT ASYNC_CANCEL LINK_TIMEOUT CONNECT",
    (5, 6): "FALLOCATE OPENAT CLOSE FILES_UPDATE STATX READ WRITE FADVISE MADVISE SEND RECV "
    "OPENAT2 EPOLL_CTL",
    (5, 7): "SPLICE PROVIDE_BUFFERS REMOVE_BUFFERS",
    (5, 8): "TEE",
    (5, 11): "SHUTDOWN RENAMEAT UNLINKAT",
    (5, 15): "MKDIRAT SYMLINKAT LINKAT",
    (5, 18): "MSG_RING",
    (5, 19): "FSETXATTR SETXATTR FGETXATTR GETXATTR SOCKET URING_CMD",
    (6, 0): "SEND_ZC",
    (6, 1): "SENDMSG_ZC",
    (6, 7): "READ_MULTISHOT WAITID FUTEX_WAIT FUTEX_WAKE FUTEX_WAITV",
    (6, 8): "FIXED_FD_INSTALL",
    (6, 9): "FTRUNCATE",
    (6, 11): "BIND LISTEN",
    (6, 15): "RECV_ZC EPOLL_WAIT READV_FIXED WRITEV_FIXED",
    (6, 16): "PIPE",
}
OPCODE_SINCE: dict[str, tuple[int, int]] = {
    name: release for release, names in _OPCODES_BY_RELEASE.items() for name in names.split()
}


def emulated_kernel() -> tuple[int, int] | None:
    """The release URINGLOOP_EMULATE_KERNEL asks for ("5.19", "6.1.0"), or None.

    Raises ValueError for a malformed value or one older than the loop supports.
    """
    value = os.environ.get("URINGLOOP_EMULATE_KERNEL", "").strip()
    if not value:
        return None
    parts = value.split(".")
    try:
        release = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        raise ValueError(
            f"URINGLOOP_EMULATE_KERNEL={value!r}: expected a kernel release like 5.19 or 6.1"
        ) from None
    if release < OLDEST_EMULATED_KERNEL:
        oldest = ".".join(map(str, OLDEST_EMULATED_KERNEL))
        raise ValueError(
            f"URINGLOOP_EMULATE_KERNEL={value!r}: uringloop needs Linux {oldest} or newer"
        )
    return release


def _newer(since: tuple[int, int] | None, release: tuple[int, int] | None) -> bool:
    """Whether a feature of this release is hidden by the emulation (unknown: hidden)."""
    return release is not None and (since is None or since > release)


class UringUnavailableError(OSError):
    """io_uring cannot be used in this process; the message says why and how to fix it."""


def _read_sysctl(name: str) -> str | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None


def explain_setup_error(err: int) -> UringUnavailableError:
    """Build the error a user sees when io_uring_setup is refused."""
    name = errno.errorcode.get(err, str(err))
    disabled = _read_sysctl("kernel.io_uring_disabled")
    if err == errno.ENOSYS:
        why = (
            "the kernel has no io_uring (Linux older than 5.1 or built without "
            "CONFIG_IO_URING), or a seccomp filter hides io_uring_setup (Docker's default "
            "profile since 2023 does)"
        )
        fix = (
            "run on Linux 6.1 or newer, or allow io_uring_setup/io_uring_enter/"
            "io_uring_register in the container's seccomp profile"
        )
    elif err == errno.EPERM:
        if disabled and disabled != "0":
            why = f"the sysctl kernel.io_uring_disabled is {disabled}" + (
                " (io_uring is off for everyone)"
                if disabled == "2"
                else " (only CAP_SYS_ADMIN or members of kernel.io_uring_group may use it)"
            )
            fix = "set kernel.io_uring_disabled=0, or add this user to kernel.io_uring_group"
        else:
            why = "a seccomp filter or security module refuses io_uring_setup"
            fix = "allow the io_uring syscalls in the seccomp profile (or sandbox policy)"
    elif err in (errno.EACCES, errno.EOPNOTSUPP):
        why = "a security policy of this host or sandbox refuses io_uring"
        fix = "ask for io_uring to be allowed, or run where it is"
    elif err == errno.ENOMEM:
        why = "the kernel could not allocate the ring (RLIMIT_MEMLOCK may be too low)"
        fix = "raise the memlock limit (ulimit -l)"
    else:
        why = "io_uring_setup failed"
        fix = "check the kernel's io_uring support"
    msg = (
        f"io_uring is unavailable: io_uring_setup failed with {name} ({os.strerror(err)}): "
        f"{why}. To fix: {fix}. uringloop.EventLoopPolicy() and uringloop.install() fall back "
        f"to asyncio's default loop unless URINGLOOP_REQUIRE=1."
    )
    return UringUnavailableError(err, msg)


@dataclass
class RingSetup:
    """What one ring was set up with."""

    ring: object  # cffi "struct io_uring *", owns the memory
    flags: int
    features: int
    sq_entries: int
    cq_entries: int
    rung: str
    refused: list[tuple[str, int]] = field(default_factory=list)
    restricted: bool = False  # IORING_REGISTER_RESTRICTIONS applied (see ul_restrict_ring)

    @property
    def flag_names(self) -> list[str]:
        return [n for n, v in SETUP_FLAG_NAMES.items() if self.flags & v]

    @property
    def feature_names(self) -> list[str]:
        return [n for n, v in FEATURE_NAMES.items() if self.features & v]


_NAMED_RUNGS = {"defer": 0, "coop": 1, "plain": len(SETUP_LADDER) - 1}


def _ladder(setup: str) -> tuple[tuple[str, int], ...]:
    if setup == "auto":
        if os.environ.get("URINGLOOP_SINGLE_ISSUER", "1") == "0":
            return SETUP_LADDER[2:]
        return SETUP_LADDER
    if setup not in _NAMED_RUNGS:
        raise ValueError(f"unknown ring setup {setup!r}: use 'auto', 'defer', 'coop' or 'plain'")
    return (SETUP_LADDER[_NAMED_RUNGS[setup]],)


def create_ring(setup: str = "auto", sq_entries: int = SQ_ENTRIES) -> RingSetup:
    """Set up a ring, stepping down the flag ladder on EINVAL.

    Raises UringUnavailableError when io_uring itself is refused. On ENOMEM
    (RLIMIT_MEMLOCK) the ring is halved, down to MIN_SQ_ENTRIES; each size refused is
    listed in `refused`.
    """
    refused: list[tuple[str, int]] = []
    emulated = emulated_kernel()
    cq_entries = _cq_entries(sq_entries)
    sq_entries = min(sq_entries, cq_entries)
    for rung, flags in _ladder(setup):
        if any(
            flags & SETUP_FLAG_NAMES[name] and _newer(since, emulated)
            for name, since in SETUP_FLAG_SINCE.items()
            if name in SETUP_FLAG_NAMES
        ):
            refused.append((rung, errno.EINVAL))  # as that kernel would answer
            continue
        ring = ffi.new("struct io_uring *")
        params = ffi.new("struct io_uring_params *")
        sq, cq = sq_entries, cq_entries
        while True:
            ret = _queue_init(sq, cq, flags | lib.IORING_SETUP_CQSIZE, ring, params)
            if ret != -errno.ENOMEM or sq <= MIN_SQ_ENTRIES:
                break
            refused.append((f"{rung} with {sq}/{cq} entries", errno.ENOMEM))
            sq, cq = sq // 2, max(cq // 2, MIN_SQ_ENTRIES * 2)
        if ret == 0:
            if emulated is not None:  # the ring reports the features of that release
                ring.features &= _emulated_mask(RING_FEATURE_SINCE, FEATURE_NAMES, emulated)
                params.features = ring.features
            return RingSetup(
                ring=ring,
                flags=params.flags,
                features=params.features,
                sq_entries=params.sq_entries,
                cq_entries=params.cq_entries,
                rung=rung,
                refused=refused,
                restricted=_restrict(ring, params.flags),
            )
        if ret != -errno.EINVAL:
            raise explain_setup_error(-ret)
        refused.append((rung, -ret))
    raise UringUnavailableError(
        errno.EINVAL, "io_uring_setup refused every set-up flag combination (EINVAL)"
    )


MIN_SQ_ENTRIES = 32
# How long set-up waits for the memory charge of rings closed just before to be released.
_ENOMEM_WAITS = (0.002, 0.005, 0.01, 0.02, 0.04)


def _queue_init(sq: int, cq: int, flags: int, ring: object, params: object) -> int:
    """io_uring_queue_init_params, tried again while it answers ENOMEM for a short while."""
    for wait in (0.0, *_ENOMEM_WAITS):
        if wait:
            time.sleep(wait)
        size = ffi.sizeof("struct io_uring_params")
        ffi.memmove(params, bytes(size), size)
        params.flags = flags
        params.cq_entries = cq
        ret = lib.io_uring_queue_init_params(sq, ring, params)
        if ret != -errno.ENOMEM:
            return ret
    return ret


def _emulated_mask(since: dict[str, tuple[int, int]], bits: dict[str, int], release) -> int:
    """Every bit of `bits` except those newer than the emulated release."""
    mask = ~0
    for name, bit in bits.items():
        if _newer(since.get(name), release):
            mask &= ~bit
    return mask & 0xFFFFFFFF


def _restrict(ring: object, flags: int) -> bool:
    """Register the loop's allow-list on a ring still disabled; whether it took.

    URINGLOOP_RESTRICT_RING=0 leaves the ring unrestricted (to tell, when something is
    refused with EACCES, whether the list is the cause). A kernel without restrictions
    (or an emulated one older than 5.10) runs the ring unrestricted.
    """
    if not flags & lib.IORING_SETUP_R_DISABLED:
        return False
    if os.environ.get("URINGLOOP_RESTRICT_RING", "1") == "0":
        return False
    if _newer(REQUEST_FEATURE_SINCE["restrictions"], emulated_kernel()):
        return False
    return lib.ul_restrict_ring(ring) == 0


def destroy_ring(setup: RingSetup, forked: bool = False) -> None:
    """Unmap the ring and close its fd; in a forked child only close the child's fd.

    The ring memory is MADV_DONTFORK (the data plane marks it so that a child cannot
    write into the parent's SQ): a child has none of it mapped, and
    io_uring_queue_exit() would read the SQ's size from it.
    """
    if forked:
        os.close(setup.ring.ring_fd)
    else:
        lib.io_uring_queue_exit(setup.ring)


@dataclass(frozen=True)
class Features:
    """What this kernel's io_uring can do, probed (never guessed from a version)."""

    kernel: str
    opcodes: frozenset[str]
    setup_flags: dict[str, bool]
    ring_features: tuple[str, ...]
    send_zc: bool
    send_zc_report_usage: bool
    multishot_accept: bool
    recv_multishot: bool
    provided_buffer_rings: bool
    registered_buffers: bool
    # URINGLOOP_EMULATE_KERNEL: the release emulated ("5.19"), and what this kernel has
    # that the emulation hides (set-up flags, ring features, opcodes, request features)
    emulated_kernel: str | None = None
    hidden: tuple[str, ...] = ()

    def has(self, opcode: str) -> bool:
        return opcode in self.opcodes


def _probe_setup_flag(flags: int) -> bool:
    ring = ffi.new("struct io_uring *")
    params = ffi.new("struct io_uring_params *")
    ret = _queue_init(4, 16, flags, ring, params)
    if ret == 0:
        lib.io_uring_queue_exit(ring)
        return True
    if ret == -errno.EINVAL:
        return False
    raise explain_setup_error(-ret)


@functools.lru_cache(maxsize=1)
def probe() -> Features:
    """Probe the running kernel once per process. Raises UringUnavailableError."""
    s = lib
    flag_sets = {
        "CQSIZE": s.IORING_SETUP_CQSIZE,
        "CLAMP": s.IORING_SETUP_CLAMP,
        "SUBMIT_ALL": s.IORING_SETUP_SUBMIT_ALL,
        "COOP_TASKRUN": s.IORING_SETUP_COOP_TASKRUN,
        "TASKRUN_FLAG": s.IORING_SETUP_COOP_TASKRUN | s.IORING_SETUP_TASKRUN_FLAG,
        "SINGLE_ISSUER": s.IORING_SETUP_SINGLE_ISSUER,
        "DEFER_TASKRUN": s.IORING_SETUP_SINGLE_ISSUER | s.IORING_SETUP_DEFER_TASKRUN,
        "R_DISABLED": s.IORING_SETUP_R_DISABLED,
    }
    flags = {name: _probe_setup_flag(v) for name, v in flag_sets.items()}

    ring = ffi.new("struct io_uring *")
    params = ffi.new("struct io_uring_params *")
    ret = _queue_init(8, 16, 0, ring, params)
    if ret < 0:
        raise explain_setup_error(-ret)
    try:
        probe_ptr = lib.io_uring_get_probe_ring(ring)
        opcodes: set[str] = set()
        if probe_ptr != ffi.NULL:
            try:
                for number in range(probe_ptr.last_op + 1):
                    if lib.io_uring_opcode_supported(probe_ptr, number):
                        known = number < len(OPCODE_NAMES)
                        opcodes.add(OPCODE_NAMES[number] if known else f"OP_{number}")
            finally:
                lib.io_uring_free_probe(probe_ptr)
        send_zc = "SEND_ZC" in opcodes
        report_usage = send_zc and lib.ul_try_send_zc_report_usage(ring) == 0
        buf_rings = lib.ul_try_buf_ring(ring) == 0
        recv_multishot = buf_rings and lib.ul_try_recv_multishot(ring) == 0
        multishot_accept = "ACCEPT" in opcodes and lib.ul_try_multishot_accept(ring) == 0
        registered = _try_register_buffers(ring)
    finally:
        lib.io_uring_queue_exit(ring)
    features = Features(
        kernel=platform.release(),
        opcodes=frozenset(opcodes),
        setup_flags=flags,
        ring_features=tuple(n for n, v in FEATURE_NAMES.items() if params.features & v),
        send_zc=send_zc,
        send_zc_report_usage=report_usage,
        multishot_accept=multishot_accept,
        recv_multishot=recv_multishot,
        provided_buffer_rings=buf_rings,
        registered_buffers=registered,
    )
    emulated = emulated_kernel()
    return features if emulated is None else _as_on(features, emulated)


def _as_on(real: Features, release: tuple[int, int]) -> Features:
    """What the probe would have found on that release: the real findings, less what
    came later."""
    hidden: list[str] = []

    def keep(kind: str, name: str, since: tuple[int, int] | None) -> bool:
        if _newer(since, release):
            hidden.append(f"{kind} {name}")
            return False
        return True

    setup_flags = {
        name: ok and keep("set-up flag", name, SETUP_FLAG_SINCE.get(name))
        for name, ok in real.setup_flags.items()
    }
    ring_features = tuple(
        n for n in real.ring_features if keep("ring feature", n, RING_FEATURE_SINCE.get(n))
    )
    opcodes = frozenset(o for o in sorted(real.opcodes) if keep("opcode", o, OPCODE_SINCE.get(o)))
    requests = {
        name: getattr(real, name) and keep("request feature", name, since)
        for name, since in REQUEST_FEATURE_SINCE.items()
        if name != "restrictions"
    }
    # (features built on others go with them: a real 6.0 probe finds no multishot
    # receive without buffer rings, and no usage reports without SEND_ZC)
    requests["recv_multishot"] &= requests["provided_buffer_rings"]
    requests["send_zc_report_usage"] &= requests["send_zc"]
    if _newer(REQUEST_FEATURE_SINCE["restrictions"], release):
        hidden.append("restrictions")
    return Features(
        kernel=real.kernel,
        opcodes=opcodes,
        setup_flags=setup_flags,
        ring_features=ring_features,
        emulated_kernel=f"{release[0]}.{release[1]}",
        hidden=tuple(hidden),
        **requests,
    )


def _try_register_buffers(ring: object) -> bool:
    mem = ffi.new("char[]", 4096)
    iov = ffi.new("struct iovec *")
    iov.iov_base = mem
    iov.iov_len = 4096
    if lib.io_uring_register_buffers(ring, iov, 1) != 0:
        return False
    lib.io_uring_unregister_buffers(ring)
    return True
