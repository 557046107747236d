/* Connection churn load generator: C, blocking sockets, a few threads.
 *
 * usage: churn_client HOST PORT echo|abort CYCLES MESSAGE_BYTES THREADS [FIRST]
 * Every cycle is a new connection. echo: connect, send MESSAGE_BYTES, read them back
 * (checked), close. abort: connect, then by cycle number n: n % 3 == 0, reset it
 * (SO_LINGER 0 and close); 1, send "!" (the churn server then aborts its side) and
 * read until the end it makes, then close; 2, close with nothing sent. Cycles FIRST..
 * FIRST+CYCLES-1 are shared out round robin between THREADS threads, each running one
 * connection at a time. Prints one JSON line: cycles, seconds, cycles per second,
 * resets seen; exits 1 on the first failure (connect, short echo, wrong bytes).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in addr;
static int echo_kind;
static long cycles, first_cycle, threads;
static size_t size;
static char *payload;
static atomic_long resets;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void fail(long n, const char *what)
{
    fprintf(stderr, "churn_client: cycle %ld: %s: %s\n", n, what, strerror(errno));
    exit(1);
}

static int connect_one(long n)
{
    for (int attempt = 0;; attempt++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            fail(n, "socket");
        if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            return fd;
        }
        /* every local port briefly in TIME_WAIT: wait for one to come free */
        if (errno != EADDRNOTAVAIL || attempt == 100)
            fail(n, "connect");
        close(fd);
        usleep(10000);
    }
}

static void send_all(long n, int fd, const char *p, size_t len)
{
    while (len) {
        ssize_t k = send(fd, p, len, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            fail(n, "send");
        }
        p += k;
        len -= k;
    }
}

static void cycle(long n, char *buf)
{
    int fd = connect_one(n);
    if (echo_kind) {
        send_all(n, fd, payload, size);
        size_t got = 0;
        while (got < size) {
            ssize_t k = recv(fd, buf + got, size - got, 0);
            if (k == 0)
                errno = 0, fail(n, "the server closed before the whole echo");
            if (k < 0) {
                if (errno == EINTR)
                    continue;
                fail(n, "recv");
            }
            got += k;
        }
        if (memcmp(buf, payload, size) != 0)
            errno = 0, fail(n, "the echo differs from what was sent");
    } else if (n % 3 == 0) {
        struct linger lg = {1, 0};
        if (setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)) < 0)
            fail(n, "SO_LINGER");
    } else if (n % 3 == 1) {
        send_all(n, fd, "!", 1);
        for (;;) {
            ssize_t k = recv(fd, buf, size, 0);
            if (k > 0 || (k < 0 && errno == EINTR))
                continue;
            if (k < 0 && errno != ECONNRESET)
                fail(n, "recv");
            if (k < 0)
                atomic_fetch_add(&resets, 1);
            break;
        }
    }
    close(fd);
}

static void *run(void *arg)
{
    long t = (long)arg;
    char *buf = malloc(size);
    if (!buf)
        fail(first_cycle + t, "malloc");
    for (long n = first_cycle + t; n < first_cycle + cycles; n += threads)
        cycle(n, buf);
    free(buf);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 7) {
        fprintf(stderr, "usage: %s HOST PORT echo|abort CYCLES MESSAGE_BYTES THREADS [FIRST]\n",
                argv[0]);
        return 2;
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons(atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "churn_client: not an IPv4 address: %s\n", argv[1]);
        return 2;
    }
    if (strcmp(argv[3], "echo") && strcmp(argv[3], "abort")) {
        fprintf(stderr, "churn_client: kind is echo or abort, not %s\n", argv[3]);
        return 2;
    }
    echo_kind = strcmp(argv[3], "echo") == 0;
    cycles = atol(argv[4]);
    size = (size_t)atol(argv[5]);
    threads = atol(argv[6]);
    first_cycle = argc > 7 ? atol(argv[7]) : 0;
    if (size < 1 || threads < 1 || cycles < 0) {
        fprintf(stderr, "churn_client: MESSAGE_BYTES and THREADS must be positive\n");
        return 2;
    }
    payload = malloc(size);
    if (!payload)
        fail(0, "malloc");
    for (size_t i = 0; i < size; i++)
        payload[i] = 'a' + i % 26; /* never "!" or "?": those are the server's commands */
    pthread_t *tids = calloc(threads, sizeof(*tids));
    double t0 = now();
    for (long t = 0; t < threads; t++)
        if ((errno = pthread_create(&tids[t], NULL, run, (void *)t)))
            fail(0, "pthread_create");
    for (long t = 0; t < threads; t++)
        pthread_join(tids[t], NULL);
    double secs = now() - t0;
    printf("{\"cycles\": %ld, \"seconds\": %.6f, \"cycles_per_s\": %.1f, \"resets\": %ld}\n", cycles,
           secs, secs > 0 ? cycles / secs : 0.0, atomic_load(&resets));
    return 0;
}
