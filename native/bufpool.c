/* The arena behind loop.alloc_zerocopy_buffer(); see bufpool.h. */
#include "bufpool.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static size_t round_up(size_t n, size_t page) { return (n + page - 1) / page * page; }

int bufpool_init(struct bufpool *p, size_t size)
{
    memset(p, 0, sizeof(*p));
    p->page = (size_t)sysconf(_SC_PAGESIZE);
    size = round_up(size ? size : 1, p->page);
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return -1;
    p->free = malloc(8 * sizeof(*p->free));
    if (!p->free) {
        munmap(mem, size);
        errno = ENOMEM;
        return -1;
    }
    p->capfree = 8;
    p->base = mem;
    p->size = size;
    p->free[0].off = 0;
    p->free[0].len = size;
    p->nfree = 1;
    return 0;
}

void bufpool_destroy(struct bufpool *p)
{
    if (p->base)
        munmap(p->base, p->size);
    free(p->free);
    memset(p, 0, sizeof(*p));
}

char *bufpool_alloc(struct bufpool *p, size_t len)
{
    len = round_up(len ? len : 1, p->page);
    for (size_t i = 0; i < p->nfree; i++) {
        struct bufpool_extent *e = &p->free[i];
        if (e->len < len)
            continue;
        char *ptr = p->base + e->off;
        e->off += len;
        e->len -= len;
        if (e->len == 0) {
            memmove(e, e + 1, (p->nfree - i - 1) * sizeof(*e));
            p->nfree--;
        }
        p->used += len;
        return ptr;
    }
    return NULL;
}

void bufpool_release(struct bufpool *p, char *ptr, size_t len)
{
    len = round_up(len ? len : 1, p->page);
    size_t off = (size_t)(ptr - p->base), i = 0;
    while (i < p->nfree && p->free[i].off < off)
        i++;
    p->used -= len;
    int joins_prev = i > 0 && p->free[i - 1].off + p->free[i - 1].len == off;
    int joins_next = i < p->nfree && off + len == p->free[i].off;
    if (joins_prev && joins_next) {
        p->free[i - 1].len += len + p->free[i].len;
        memmove(&p->free[i], &p->free[i + 1], (p->nfree - i - 1) * sizeof(*p->free));
        p->nfree--;
    } else if (joins_prev) {
        p->free[i - 1].len += len;
    } else if (joins_next) {
        p->free[i].off = off;
        p->free[i].len += len;
    } else {
        if (p->nfree == p->capfree) {
            struct bufpool_extent *n = realloc(p->free, 2 * p->capfree * sizeof(*n));
            if (!n)
                return; /* the range is lost to the pool, never handed out twice */
            p->free = n;
            p->capfree *= 2;
        }
        memmove(&p->free[i + 1], &p->free[i], (p->nfree - i) * sizeof(*p->free));
        p->free[i].off = off;
        p->free[i].len = len;
        p->nfree++;
    }
}

int bufpool_contains(const struct bufpool *p, const char *ptr, size_t len)
{
    return p->base && ptr >= p->base && len <= p->size && (size_t)(ptr - p->base) <= p->size - len;
}
