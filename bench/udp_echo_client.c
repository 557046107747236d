/* UDP echo load generator: C, epoll, one thread, so the client is never the bottleneck.
 *
 * usage: udp_echo_client HOST PORT CLIENTS DATAGRAM_BYTES SECONDS
 * Each client is its own UDP socket connected to the server, in a closed loop: it sends
 * one datagram, waits for its echo, checks it (length, last byte, and the first byte,
 * which carries the client's send counter mod 256), records the round trip, and sends
 * the next. A client that waits more than LOSS_TIMEOUT for an echo counts a loss and
 * sends again, so a dropped datagram cannot stall the run; an echo that comes back
 * after that (first byte of an older send) is counted as stale and ignored.
 * Prints one JSON line: datagrams (echoes received), seconds, datagrams per second,
 * latency percentiles in microseconds (a round trip that needed a resend counts from its
 * first send), losses and stale echoes. Exits 1 on a malformed echo or a socket error.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HIST_US 200000 /* latencies up to 200 ms at 1 us resolution; above goes in the last bucket */
#define LOSS_TIMEOUT 0.2 /* seconds without an echo before a client resends */
#define SCAN_EVERY 0.01  /* how often clients are checked for a lost datagram */
#define MAX_DATAGRAM 65507

struct client {
    int fd;
    uint8_t tag;      /* first byte of the datagram in flight */
    int blocked;      /* send hit EAGAIN: waiting for EPOLLOUT */
    double started;   /* first send of the current round trip */
    double sent_at;   /* last (re)send */
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

static int ep;
static char *msg;
static size_t size;

static void want_out(struct client *c, int on)
{
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->blocked = on;
}

/* Send the next datagram (a new tag each time, resends included). */
static int send_one(struct client *c, double t)
{
    c->tag++;
    c->sent_at = t;
    msg[0] = (char)c->tag;
    ssize_t n = send(c->fd, msg, size, 0);
    if (n == (ssize_t)size) {
        if (c->blocked)
            want_out(c, 0);
        return 0;
    }
    if (n < 0 && (errno == EAGAIN || errno == ENOBUFS)) {
        c->tag--; /* not sent: send this one again on EPOLLOUT */
        if (!c->blocked)
            want_out(c, 1);
        return 0;
    }
    if (n >= 0)
        fprintf(stderr, "short datagram send: %zd of %zu\n", n, size);
    else
        perror("send");
    return -1;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s HOST PORT CLIENTS DATAGRAM_BYTES SECONDS\n", argv[0]);
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]), nclients = atoi(argv[3]);
    size = strtoul(argv[4], NULL, 10);
    double seconds = atof(argv[5]);
    if (size < 1 || size > MAX_DATAGRAM || nclients < 1) {
        fprintf(stderr, "need 1 <= DATAGRAM_BYTES <= %d and CLIENTS >= 1\n", MAX_DATAGRAM);
        return 2;
    }

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address %s\n", host);
        return 2;
    }
    msg = malloc(size);
    char *buf = malloc(MAX_DATAGRAM + 1);
    for (size_t i = 0; i < size; i++)
        msg[i] = (char)('a' + i % 26);
    const char last = msg[size - 1]; /* (with size 1 the only byte is the tag) */

    ep = epoll_create1(0);
    struct client *clients = calloc(nclients, sizeof(*clients));
    for (int i = 0; i < nclients; i++) {
        int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
            perror("socket/connect");
            return 1;
        }
        clients[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &clients[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }

    double start = now(), deadline = start + seconds, last_scan = start;
    uint64_t datagrams = 0, losses = 0, stale = 0;
    for (int i = 0; i < nclients; i++) {
        clients[i].started = now();
        if (send_one(&clients[i], clients[i].started) < 0)
            return 1;
    }
    struct epoll_event events[256];
    double t = start;
    while (t < deadline) {
        int n = epoll_wait(ep, events, 256, (int)(SCAN_EVERY * 1000));
        t = now();
        for (int i = 0; i < n; i++) {
            struct client *c = events[i].data.ptr;
            if (c->blocked && events[i].events & EPOLLOUT && send_one(c, t) < 0)
                return 1;
            if (!(events[i].events & (EPOLLIN | EPOLLERR)))
                continue;
            /* one datagram per event: level-triggered, a second one is reported again */
            ssize_t r = recv(c->fd, buf, MAX_DATAGRAM + 1, MSG_TRUNC);
            if (r < 0) {
                if (errno == EAGAIN)
                    continue;
                if (errno == ECONNREFUSED)
                    fprintf(stderr, "the server's port is closed (ICMP port unreachable)\n");
                else
                    perror("recv");
                return 1;
            }
            if ((size_t)r != size || (size > 1 && buf[size - 1] != last)) {
                fprintf(stderr, "malformed echo: %zd bytes (want %zu), last byte %d\n", r,
                        size, buf[r > 0 && (size_t)r <= size ? r - 1 : 0]);
                return 1;
            }
            if ((uint8_t)buf[0] != c->tag || c->blocked) {
                stale++; /* the echo of a datagram already counted lost */
                continue;
            }
            double lat = (t - c->started) * 1e6;
            hist[lat < HIST_US ? (int)lat : HIST_US]++;
            datagrams++;
            c->started = t;
            if (send_one(c, t) < 0)
                return 1;
        }
        if (t - last_scan >= SCAN_EVERY) {
            last_scan = t;
            for (int i = 0; i < nclients; i++) {
                struct client *c = &clients[i];
                if (!c->blocked && t - c->sent_at > LOSS_TIMEOUT) {
                    losses++;
                    if (send_one(c, t) < 0)
                        return 1;
                }
            }
        }
    }
    double elapsed = now() - start;
    printf("{\"datagrams\": %llu, \"seconds\": %.4f, \"dgram_per_s\": %.1f, \"p50_us\": %.0f, "
           "\"p99_us\": %.0f, \"losses\": %llu, \"stale\": %llu}\n",
           (unsigned long long)datagrams, elapsed, datagrams / elapsed,
           percentile(datagrams, 0.5), percentile(datagrams, 0.99), (unsigned long long)losses,
           (unsigned long long)stale);
    return 0;
}
