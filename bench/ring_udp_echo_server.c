/* Reference ceiling: a plain UDP echo server in C on liburing.
 *
 * usage: ring_udp_echo_server [PORT [RCVBUF_BYTES]]
 * Prints "READY <port>" once bound to 127.0.0.1 and serves until killed.
 *
 * What "plain" means here: what any competent C server on io_uring would do, and
 * nothing a Python event loop could not do in principle. One ring with
 * SINGLE_ISSUER|DEFER_TASKRUN (stepping down on EINVAL), one multishot RECVMSG that
 * picks its buffers from a provided buffer ring (io_uring_recvmsg_out parsing for the
 * source address and the payload), one SENDMSG per datagram from that same buffer back
 * to its source, and the buffer goes back to the ring when the send completes. One
 * io_uring_enter per iteration submits the batch of sends and waits.
 * No zero-copy and no GSO: the benchmark tables compare it with loops that must hand
 * every datagram to Python as a bytes object.
 */
#define _GNU_SOURCE
#include <errno.h>
#include "../native/compat.h" /* flag names newer than Debian's liburing 2.3 */
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef SO_RCVBUFFORCE
#define SO_RCVBUFFORCE 33
#endif

#ifndef NBUFS
#define NBUFS 512 /* buffers in the ring (a power of two): 4x the most clients in flight */
#endif
#define BUF_SIZE (65536 + 4096)    /* io_uring_recvmsg_out + address + the largest datagram */
#define BGID 0

enum { OP_RECV = 1, OP_SEND = 2 };

struct slot { /* a datagram being sent back, from buffer `bid` */
    struct msghdr mh;
    struct iovec iov;
};

static struct io_uring ring;
static struct io_uring_buf_ring *br;
static char *bufs;
static struct slot slots[NBUFS];
static struct msghdr recv_mh = {.msg_namelen = sizeof(struct sockaddr_in)};
static int sfd, armed, held, returned;

static struct io_uring_sqe *sqe_get(void)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    if (!sqe) {
        io_uring_submit(&ring);
        sqe = io_uring_get_sqe(&ring);
    }
    return sqe;
}

static void prep_recv(void)
{
    struct io_uring_sqe *sqe = sqe_get();
    io_uring_prep_recvmsg_multishot(sqe, sfd, &recv_mh, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = BGID;
    io_uring_sqe_set_data64(sqe, OP_RECV);
    armed = 1;
}

/* Give buffer `bid` back to the kernel (published by one advance per iteration). */
static void buf_return(unsigned bid)
{
    io_uring_buf_ring_add(br, bufs + (size_t)bid * BUF_SIZE, BUF_SIZE, bid,
                          io_uring_buf_ring_mask(NBUFS), returned++);
}

static void set_rcvbuf(int fd, int bytes)
{
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof(bytes)) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes));
}

int main(int argc, char **argv)
{
    int port = argc > 1 ? atoi(argv[1]) : 0;
    int rcvbuf = argc > 2 ? atoi(argv[2]) : 0;

    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    if (io_uring_queue_init_params(1024, &ring, &p) < 0) {
        memset(&p, 0, sizeof(p));
        int ret = io_uring_queue_init_params(1024, &ring, &p);
        if (ret < 0) {
            fprintf(stderr, "io_uring_queue_init: %s\n", strerror(-ret));
            return 1;
        }
    }

    /* the provided buffer ring (liburing 2.3 has no io_uring_setup_buf_ring) */
    size_t ring_bytes = NBUFS * sizeof(struct io_uring_buf);
    br = mmap(NULL, ring_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    bufs = mmap(NULL, (size_t)NBUFS * BUF_SIZE, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (br == MAP_FAILED || bufs == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    io_uring_buf_ring_init(br);
    struct io_uring_buf_reg reg = {
        .ring_addr = (unsigned long)br, .ring_entries = NBUFS, .bgid = BGID};
    int ret = io_uring_register_buf_ring(&ring, &reg, 0);
    if (ret < 0) {
        fprintf(stderr, "io_uring_register_buf_ring: %s\n", strerror(-ret));
        return 1;
    }
    for (unsigned bid = 0; bid < NBUFS; bid++)
        buf_return(bid);
    io_uring_buf_ring_advance(br, returned);
    returned = 0;

    sfd = socket(AF_INET, SOCK_DGRAM, 0);
    if (rcvbuf > 0)
        set_rcvbuf(sfd, rcvbuf);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof(addr);
    if (bind(sfd, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
        getsockname(sfd, (struct sockaddr *)&addr, &alen) < 0) {
        perror("bind");
        return 1;
    }
    printf("READY %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    prep_recv();

    for (;;) {
        struct io_uring_cqe *cqe;
        ret = io_uring_submit_and_wait(&ring, 1);
        if (ret < 0 && ret != -EINTR && ret != -ETIME) {
            fprintf(stderr, "io_uring_submit_and_wait: %s\n", strerror(-ret));
            return 1;
        }
        unsigned head, n = 0;
        io_uring_for_each_cqe(&ring, head, cqe)
        {
            n++;
            int res = cqe->res;
            if (cqe->user_data == OP_RECV) {
                if (!(cqe->flags & IORING_CQE_F_MORE))
                    armed = 0; /* out of buffers (-ENOBUFS) or ended: armed again below */
                if (res < 0 && res != -ENOBUFS) {
                    fprintf(stderr, "recvmsg: %s\n", strerror(-res));
                    return 1;
                }
                if (!(cqe->flags & IORING_CQE_F_BUFFER))
                    continue;
                unsigned bid = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
                char *buf = bufs + (size_t)bid * BUF_SIZE;
                struct io_uring_recvmsg_out *o = io_uring_recvmsg_validate(buf, res, &recv_mh);
                if (!o || o->flags & MSG_TRUNC || o->namelen > sizeof(struct sockaddr_in)) {
                    buf_return(bid);
                    continue;
                }
                struct slot *s = &slots[bid];
                s->iov.iov_base = io_uring_recvmsg_payload(o, &recv_mh);
                s->iov.iov_len = io_uring_recvmsg_payload_length(o, res, &recv_mh);
                s->mh.msg_name = io_uring_recvmsg_name(o);
                s->mh.msg_namelen = o->namelen;
                s->mh.msg_iov = &s->iov;
                s->mh.msg_iovlen = 1;
                struct io_uring_sqe *sqe = sqe_get();
                io_uring_prep_sendmsg(sqe, sfd, &s->mh, 0);
                io_uring_sqe_set_data64(sqe, (uint64_t)bid << 8 | OP_SEND);
                held++;
            } else {
                /* a send failed or not: the datagram is done with, its buffer goes back */
                buf_return((unsigned)(cqe->user_data >> 8));
                held--;
            }
        }
        io_uring_cq_advance(&ring, n);
        if (returned) {
            io_uring_buf_ring_advance(br, returned);
            returned = 0;
        }
        if (!armed && held < NBUFS)
            prep_recv();
    }
}
