/* Echo load generator: C, epoll, one thread, so the client is never the bottleneck.
 *
 * usage: echo_client HOST PORT CONNECTIONS MESSAGE_BYTES SECONDS
 * Each connection sends one message, waits for all of it to come back, records the
 * round trip, and sends the next. Prints one JSON line: requests, seconds, requests
 * per second and latency percentiles in microseconds.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HIST_US 200000 /* latencies up to 200 ms at 1 us resolution; above goes in the last bucket */

struct conn {
    int fd;
    size_t sent, received;
    double started;
};

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint64_t hist[HIST_US + 1];

static double percentile(uint64_t total, double p)
{
    uint64_t want = (uint64_t)(total * p), seen = 0;
    for (int i = 0; i <= HIST_US; i++) {
        seen += hist[i];
        if (seen > want)
            return i;
    }
    return HIST_US;
}

static int pump_send(struct conn *c, const char *msg, size_t size)
{
    while (c->sent < size) {
        ssize_t n = send(c->fd, msg + c->sent, size - c->sent, MSG_NOSIGNAL);
        if (n < 0)
            return errno == EAGAIN ? 0 : -1;
        c->sent += n;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s HOST PORT CONNECTIONS MESSAGE_BYTES SECONDS\n", argv[0]);
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]), nconn = atoi(argv[3]);
    size_t size = strtoul(argv[4], NULL, 10);
    double seconds = atof(argv[5]);

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address %s\n", host);
        return 2;
    }
    char *msg = malloc(size), *buf = malloc(size < 65536 ? 65536 : size);
    for (size_t i = 0; i < size; i++)
        msg[i] = (char)('a' + i % 26);

    int ep = epoll_create1(0);
    struct conn *conns = calloc(nconn, sizeof(*conns));
    for (int i = 0; i < nconn; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
            perror("connect");
            return 1;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) {
            perror("fcntl");
            return 1;
        }
        conns[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = &conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }

    double start = now(), deadline = start + seconds;
    uint64_t requests = 0;
    for (int i = 0; i < nconn; i++) {
        conns[i].started = now();
        if (pump_send(&conns[i], msg, size) < 0) {
            perror("send");
            return 1;
        }
    }
    struct epoll_event events[256];
    double t = start;
    while (t < deadline) {
        int n = epoll_wait(ep, events, 256, 100);
        t = now();
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (events[i].events & EPOLLOUT && pump_send(c, msg, size) < 0) {
                perror("send");
                return 1;
            }
            if (!(events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
                continue;
            for (;;) {
                ssize_t r = recv(c->fd, buf, size - c->received, 0);
                if (r == 0) {
                    fprintf(stderr, "server closed a connection\n");
                    return 1;
                }
                if (r < 0) {
                    if (errno == EAGAIN)
                        break;
                    perror("recv");
                    return 1;
                }
                c->received += r;
                if (c->received == size) {
                    double lat = (t - c->started) * 1e6;
                    hist[lat < HIST_US ? (int)lat : HIST_US]++;
                    requests++;
                    c->received = c->sent = 0;
                    c->started = t;
                    if (pump_send(c, msg, size) < 0) {
                        perror("send");
                        return 1;
                    }
                }
            }
        }
    }
    double elapsed = now() - start;
    printf("{\"requests\": %llu, \"seconds\": %.4f, \"rps\": %.1f, \"p50_us\": %.0f, "
           "\"p99_us\": %.0f}\n",
           (unsigned long long)requests, elapsed, requests / elapsed, percentile(requests, 0.5),
           percentile(requests, 0.99));
    return 0;
}
