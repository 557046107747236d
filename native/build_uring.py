"""cffi (API mode) binding of liburing for uringloop's control plane.

The control plane is everything that happens rarely: setting a ring up with the
best flags this kernel accepts, probing opcodes and request flags, registering
buffers. The per-event path does not go through here; it lives in the
`_dataplane` extension (`ring.c` and its siblings, rules in `dataplane.h`),
which works on the very same `struct io_uring` that
`io_uring_queue_init_params` fills in below (both are compiled against the same
liburing header, so they agree on its layout).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

MISSING_LIBURING = (
    "uringloop needs liburing's headers and library to build: install the package "
    "'liburing-dev' (Debian/Ubuntu: apt-get install liburing-dev; Fedora: dnf install "
    "liburing-devel) and run the install again."
)


def check_liburing() -> None:
    """Stop the build with one clear sentence when liburing is not installed."""
    if os.environ.get("URINGLOOP_SKIP_LIBURING_CHECK"):
        return
    cc = os.environ.get("CC", "cc").split()
    if not shutil.which(cc[0]):
        return  # let setuptools report the missing compiler itself
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write(
                "#include <liburing.h>\n"
                "int main(void) { struct io_uring r; return io_uring_queue_init(1, &r, 0) & 0; }\n"
            )
        proc = subprocess.run(
            [*cc, src, "-o", os.path.join(tmp, "t"), "-luring"],
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-2000:])
        raise SystemExit(MISSING_LIBURING)


def liburing_link() -> dict:
    """How both extensions link liburing: setuptools keyword arguments.

    By default, against the system's shared liburing (-luring). With
    URINGLOOP_STATIC_LIBURING=1 (or the path of a liburing.a), liburing's archive is linked
    into each extension instead, which is how the wheels are built (`make wheels`): a wheel
    then needs no liburing on the machine it is installed on. The two extensions each get
    a private copy of the few functions they use; they work on the same `struct io_uring`
    and liburing keeps no global state, so two copies agree. --exclude-libs keeps the
    copies out of the extensions' exported symbols, so another liburing loaded into the
    same process (a different version, say) neither interposes on ours nor ours on it.
    """
    archive = os.environ.get("URINGLOOP_STATIC_LIBURING", "")
    if archive in ("", "0"):
        return {"libraries": ["uring"], "extra_objects": [], "extra_link_args": []}
    if archive == "1":
        cc = os.environ.get("CC", "cc").split()
        archive = subprocess.run(
            [*cc, "-print-file-name=liburing.a"], capture_output=True, text=True
        ).stdout.strip()
    if not os.path.isabs(archive) or not os.path.exists(archive):
        raise SystemExit(
            f"URINGLOOP_STATIC_LIBURING: no liburing.a found ({archive!r}); install "
            "liburing-dev or give the archive's path"
        )
    return {
        "libraries": [],
        "extra_objects": [archive],
        "extra_link_args": ["-Wl,--exclude-libs,ALL"],
    }


def dataplane_compile_args() -> list[str]:
    """Compiler flags for the native parts; URINGLOOP_CFLAGS adds sanitizers in CI."""
    args = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
    if os.environ.get("URINGLOOP_WERROR", "1") != "0":
        args.append("-Werror")
    args += os.environ.get("URINGLOOP_CFLAGS", "").split()
    return args


CDEF = """
typedef unsigned int __u32;
typedef unsigned long long __u64;

struct io_uring_sq { unsigned ring_entries; ...; };
struct io_uring_cq { unsigned ring_entries; ...; };
struct io_uring {
    struct io_uring_sq sq;
    struct io_uring_cq cq;
    unsigned flags;
    int ring_fd;
    unsigned features;
    ...;
};
struct io_uring_params {
    __u32 sq_entries;
    __u32 cq_entries;
    __u32 flags;
    __u32 sq_thread_cpu;
    __u32 sq_thread_idle;
    __u32 features;
    __u32 wq_fd;
    ...;
};
struct io_uring_probe { unsigned char last_op; ...; };
struct iovec { void *iov_base; size_t iov_len; };

#define IORING_SETUP_CQSIZE ...
#define IORING_SETUP_CLAMP ...
#define IORING_SETUP_SUBMIT_ALL ...
#define IORING_SETUP_COOP_TASKRUN ...
#define IORING_SETUP_TASKRUN_FLAG ...
#define IORING_SETUP_SINGLE_ISSUER ...
#define IORING_SETUP_DEFER_TASKRUN ...
#define IORING_SETUP_R_DISABLED ...

#define IORING_FEAT_SINGLE_MMAP ...
#define IORING_FEAT_NODROP ...
#define IORING_FEAT_SUBMIT_STABLE ...
#define IORING_FEAT_FAST_POLL ...
#define IORING_FEAT_EXT_ARG ...
#define IORING_FEAT_NATIVE_WORKERS ...
#define IORING_FEAT_CQE_SKIP ...
#define IORING_FEAT_LINKED_FILE ...

int io_uring_queue_init_params(unsigned entries, struct io_uring *ring,
                               struct io_uring_params *p);
void io_uring_queue_exit(struct io_uring *ring);
struct io_uring_probe *io_uring_get_probe_ring(struct io_uring *ring);
void io_uring_free_probe(struct io_uring_probe *probe);
int io_uring_opcode_supported(const struct io_uring_probe *p, int op);
int io_uring_register_buffers(struct io_uring *ring, const struct iovec *iovecs,
                              unsigned nr_iovecs);
int io_uring_unregister_buffers(struct io_uring *ring);
int io_uring_register_ring_fd(struct io_uring *ring);
int io_uring_register(unsigned int fd, unsigned int opcode, const void *arg,
                      unsigned int nr_args);

/* trial requests: flags the opcode probe cannot see (0 = works, -errno otherwise) */
int ul_try_send_zc_report_usage(struct io_uring *ring);
int ul_try_recv_multishot(struct io_uring *ring);
int ul_try_buf_ring(struct io_uring *ring);
int ul_try_multishot_accept(struct io_uring *ring);

/* IORING_REGISTER_RESTRICTIONS on a ring still disabled: only what the loop uses
   (0, or -errno: EINVAL from a kernel without restrictions, EBUSY once enabled) */
int ul_restrict_ring(struct io_uring *ring);
/* one request of this opcode, every other field zero; the res of its CQE (tests, info) */
int ul_submit_bare_opcode(struct io_uring *ring, int opcode);
"""

SOURCE = r"""
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>
#include "compat.h"

/* Submit one prepared SQE and return the res of its first CQE. */
static int ul_run_one(struct io_uring *ring, struct io_uring_sqe *sqe, unsigned *cflags)
{
    struct io_uring_cqe *cqe;
    int ret;
    sqe->user_data = 0x55;
    ret = io_uring_submit_and_wait(ring, 1);
    if (ret < 0)
        return ret;
    ret = io_uring_wait_cqe(ring, &cqe);
    if (ret < 0)
        return ret;
    ret = cqe->res;
    if (cflags)
        *cflags = cqe->flags;
    io_uring_cqe_seen(ring, cqe);
    return ret;
}

/* Drain whatever is left (notifications, multishot tails) so the caller's ring is clean. */
static void ul_drain(struct io_uring *ring)
{
    struct io_uring_cqe *cqe;
    struct __kernel_timespec ts = {0, 20 * 1000 * 1000};
    while (io_uring_wait_cqe_timeout(ring, &cqe, &ts) == 0)
        io_uring_cqe_seen(ring, cqe);
}

int ul_try_send_zc_report_usage(struct io_uring *ring)
{
    int sv[2], ret;
    unsigned flags = 0;
    static const char byte = 'x';
    struct io_uring_sqe *sqe;

    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, sv) < 0)
        return -errno;
    sqe = io_uring_get_sqe(ring);
    if (!sqe) { close(sv[0]); close(sv[1]); return -EBUSY; }
    io_uring_prep_send_zc(sqe, sv[0], &byte, 1, 0, IORING_SEND_ZC_REPORT_USAGE);
    ret = ul_run_one(ring, sqe, &flags);
    /* AF_UNIX refuses zero-copy with EOPNOTSUPP after the flags were accepted;
       EINVAL means the kernel does not know the flag (or the opcode). */
    if (ret == -EOPNOTSUPP || ret >= 0)
        ret = 0;
    if (flags & IORING_CQE_F_MORE)
        ul_drain(ring);
    close(sv[0]);
    close(sv[1]);
    return ret;
}

int ul_try_buf_ring(struct io_uring *ring)
{
    struct io_uring_buf_reg reg;
    void *mem;
    int ret;
    mem = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (mem == MAP_FAILED)
        return -errno;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (unsigned long)mem;
    reg.ring_entries = 8;
    reg.bgid = 7;
    ret = io_uring_register_buf_ring(ring, &reg, 0);
    if (ret == 0)
        io_uring_unregister_buf_ring(ring, 7);
    munmap(mem, 4096);
    return ret;
}

int ul_try_recv_multishot(struct io_uring *ring)
{
    struct io_uring_buf_reg reg;
    struct io_uring_buf_ring *br;
    struct io_uring_sqe *sqe;
    static char buf[64];
    unsigned flags = 0;
    int sv[2], ret;

    br = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (br == MAP_FAILED)
        return -errno;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (unsigned long)br;
    reg.ring_entries = 8;
    reg.bgid = 9;
    ret = io_uring_register_buf_ring(ring, &reg, 0);
    if (ret) { munmap(br, 4096); return ret; }
    io_uring_buf_ring_init(br);
    io_uring_buf_ring_add(br, buf, sizeof(buf), 0, io_uring_buf_ring_mask(8), 0);
    io_uring_buf_ring_advance(br, 1);
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) {
        ret = -errno;
        goto out;
    }
    if (write(sv[1], "x", 1) != 1) {
        ret = -errno;
        goto out_close;
    }
    sqe = io_uring_get_sqe(ring);
    io_uring_prep_recv_multishot(sqe, sv[0], NULL, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = 9;
    ret = ul_run_one(ring, sqe, &flags);
    if (ret > 0)
        ret = 0;
    if (flags & IORING_CQE_F_MORE) {
        /* the request is still armed: cancel it and let its last CQE arrive */
        sqe = io_uring_get_sqe(ring);
        io_uring_prep_cancel_fd(sqe, sv[0], 0);
        sqe->user_data = 0x56;
        io_uring_submit(ring);
        ul_drain(ring);
    }
out_close:
    close(sv[0]);
    close(sv[1]);
out:
    io_uring_unregister_buf_ring(ring, 9);
    munmap(br, 4096);
    return ret;
}

/* What the loop's ring may be asked to do once enabled. Keep in step with the data
   plane (the native units): a request outside this list completes with -EACCES, so the
   suite, which runs on restricted rings, fails at once when one is missing.
   - opcodes: every io_uring_prep_* the data plane calls (POLL_ADD for readiness and
     the self-pipe, NOP for wake-ups, the socket requests, ASYNC_CANCEL for cancel and
     cancel_fd, SPLICE for sendfile); TIMEOUT only where the kernel lacks EXT_ARG and
     liburing puts the wait's timeout in an SQE;
   - SQE flags: BUFFER_SELECT (receives from a buffer ring), IO_LINK (splice pairs);
   - register operations: the zero-copy arena (buffers), buffer rings, enabling. */
static const unsigned char ul_allowed_ops[] = {
    IORING_OP_NOP,    IORING_OP_POLL_ADD,     IORING_OP_SENDMSG, IORING_OP_RECVMSG,
    IORING_OP_ACCEPT, IORING_OP_ASYNC_CANCEL, IORING_OP_SEND,    IORING_OP_RECV,
    IORING_OP_SPLICE, IORING_OP_SEND_ZC,
};
static const unsigned char ul_allowed_register_ops[] = {
    IORING_REGISTER_BUFFERS,  IORING_UNREGISTER_BUFFERS,   IORING_REGISTER_PBUF_RING,
    IORING_UNREGISTER_PBUF_RING, IORING_REGISTER_ENABLE_RINGS,
};

int ul_restrict_ring(struct io_uring *ring)
{
    struct io_uring_restriction res[32];
    unsigned n = 0, i;
    memset(res, 0, sizeof(res));
    for (i = 0; i < sizeof(ul_allowed_ops); i++) {
        res[n].opcode = IORING_RESTRICTION_SQE_OP;
        res[n++].sqe_op = ul_allowed_ops[i];
    }
    if (!(ring->features & IORING_FEAT_EXT_ARG)) {
        res[n].opcode = IORING_RESTRICTION_SQE_OP;
        res[n++].sqe_op = IORING_OP_TIMEOUT;
    }
    for (i = 0; i < sizeof(ul_allowed_register_ops); i++) {
        res[n].opcode = IORING_RESTRICTION_REGISTER_OP;
        res[n++].register_op = ul_allowed_register_ops[i];
    }
    res[n].opcode = IORING_RESTRICTION_SQE_FLAGS_ALLOWED;
    res[n++].sqe_flags = IOSQE_BUFFER_SELECT | IOSQE_IO_LINK;
    /* (the raw call: Debian's liburing 2.3 does not export io_uring_register_restrictions) */
    return io_uring_register(ring->ring_fd, IORING_REGISTER_RESTRICTIONS, res, n);
}

int ul_submit_bare_opcode(struct io_uring *ring, int opcode)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    struct io_uring_cqe *cqe;
    int ret;
    if (!sqe)
        return -EBUSY;
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = (unsigned char)opcode;
    sqe->fd = -1;
    sqe->user_data = 0x5ea1ed;
    ret = io_uring_submit(ring);
    if (ret < 0)
        return ret;
    for (;;) {
        ret = io_uring_wait_cqe(ring, &cqe);
        if (ret < 0)
            return ret;
        if (cqe->user_data == 0x5ea1ed)
            break;
        io_uring_cqe_seen(ring, cqe); /* (an idle ring's caller accepts losing others) */
    }
    ret = cqe->res;
    io_uring_cqe_seen(ring, cqe);
    return ret;
}

int ul_try_multishot_accept(struct io_uring *ring)
{
    struct sockaddr_in addr;
    socklen_t alen = sizeof(addr);
    struct io_uring_sqe *sqe;
    unsigned flags = 0;
    int lfd, cfd, ret;

    lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0)
        return -errno;
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(lfd, 4) < 0 ||
        getsockname(lfd, (struct sockaddr *)&addr, &alen) < 0) {
        ret = -errno;
        close(lfd);
        return ret;
    }
    cfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (cfd < 0 || connect(cfd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        ret = -errno;
        if (cfd >= 0) close(cfd);
        close(lfd);
        return ret;
    }
    sqe = io_uring_get_sqe(ring);
    io_uring_prep_multishot_accept(sqe, lfd, NULL, NULL, SOCK_CLOEXEC);
    ret = ul_run_one(ring, sqe, &flags);
    if (ret >= 0) {
        close(ret);
        ret = 0;
    }
    if (flags & IORING_CQE_F_MORE) {
        sqe = io_uring_get_sqe(ring);
        io_uring_prep_cancel_fd(sqe, lfd, 0);
        sqe->user_data = 0x56;
        io_uring_submit(ring);
        ul_drain(ring);
    }
    close(cfd);
    close(lfd);
    return ret;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
LIBURING = liburing_link()
ffibuilder.set_source(
    "uringloop._uring",
    SOURCE,
    libraries=LIBURING["libraries"],
    extra_objects=LIBURING["extra_objects"],
    include_dirs=[HERE],
    extra_compile_args=dataplane_compile_args(),
    extra_link_args=LIBURING["extra_link_args"] + os.environ.get("URINGLOOP_LDFLAGS", "").split(),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
