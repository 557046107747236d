/* Reference ceiling: a plain TCP echo server in C on liburing.
 *
 * usage: ring_echo_server [PORT [BUFFER_BYTES]]
 * Prints "READY <port>" once listening and serves until killed.
 *
 * What "plain" means here: what any competent C server on io_uring would do, and
 * nothing a Python event loop could not do in principle. One ring with
 * SINGLE_ISSUER|DEFER_TASKRUN (stepping down on EINVAL), a multishot accept, one
 * receive buffer per connection (reused, so it stays warm in the cache), a recv
 * into it, a send of what arrived from the same buffer (short sends resubmitted),
 * then the next recv. One io_uring_enter per iteration submits and waits.
 * No zero-copy and no splice: the benchmark tables compare it with loops that
 * must hand every message to Python as a bytes object.
 */
#define _GNU_SOURCE
#include <errno.h>
#include "../native/compat.h" /* flag names newer than Debian's liburing 2.3 */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

enum { OP_ACCEPT = 1, OP_RECV, OP_SEND };

struct conn {
    int fd;
    size_t len, sent;
    char *buf;
};

static size_t bufsize = 256 * 1024;
static struct io_uring ring;

static struct io_uring_sqe *sqe_get(void)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    if (!sqe) {
        io_uring_submit(&ring);
        sqe = io_uring_get_sqe(&ring);
    }
    return sqe;
}

/* user_data: the connection pointer with the operation in the low bits (8-aligned). */
static void prep_recv(struct conn *c)
{
    struct io_uring_sqe *sqe = sqe_get();
    io_uring_prep_recv(sqe, c->fd, c->buf, bufsize, 0);
    io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)c | OP_RECV);
}

static void prep_send(struct conn *c)
{
    struct io_uring_sqe *sqe = sqe_get();
    io_uring_prep_send(sqe, c->fd, c->buf + c->sent, c->len - c->sent, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)c | OP_SEND);
}

static void prep_accept(int lfd)
{
    struct io_uring_sqe *sqe = sqe_get();
    io_uring_prep_multishot_accept(sqe, lfd, NULL, NULL, 0);
    io_uring_sqe_set_data64(sqe, OP_ACCEPT);
}

static void conn_close(struct conn *c)
{
    close(c->fd);
    free(c->buf);
    free(c);
}

int main(int argc, char **argv)
{
    int port = argc > 1 ? atoi(argv[1]) : 0;
    if (argc > 2)
        bufsize = strtoul(argv[2], NULL, 10);

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

    int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof(addr);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(lfd, 1024) < 0 ||
        getsockname(lfd, (struct sockaddr *)&addr, &alen) < 0) {
        perror("listen");
        return 1;
    }
    printf("READY %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    prep_accept(lfd);

    for (;;) {
        struct io_uring_cqe *cqe;
        int ret = io_uring_submit_and_wait(&ring, 1);
        if (ret < 0 && ret != -EINTR && ret != -ETIME) {
            fprintf(stderr, "io_uring_submit_and_wait: %s\n", strerror(-ret));
            return 1;
        }
        unsigned head, n = 0;
        io_uring_for_each_cqe(&ring, head, cqe)
        {
            n++;
            uint64_t ud = cqe->user_data;
            int res = cqe->res;
            if (ud == OP_ACCEPT) {
                if (res >= 0) {
                    struct conn *c = calloc(1, sizeof(*c));
                    c->fd = res;
                    c->buf = malloc(bufsize);
                    setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    prep_recv(c);
                }
                if (!(cqe->flags & IORING_CQE_F_MORE))
                    prep_accept(lfd);
                continue;
            }
            struct conn *c = (struct conn *)(uintptr_t)(ud & ~(uint64_t)7);
            if (res <= 0) {
                conn_close(c); /* EOF, reset: the load generator ends this way */
                continue;
            }
            if ((ud & 7) == OP_RECV) {
                c->len = (size_t)res;
                c->sent = 0;
                prep_send(c);
            } else {
                c->sent += (size_t)res;
                if (c->sent < c->len)
                    prep_send(c);
                else
                    prep_recv(c);
            }
        }
        io_uring_cq_advance(&ring, n);
    }
}
