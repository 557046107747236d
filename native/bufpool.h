/* uringloop: the arena behind loop.alloc_zerocopy_buffer().
 *
 * One anonymous mapping, registered with the ring as fixed buffer 0
 * (io_uring_register_buffers), carved into page-aligned extents. A fixed
 * SEND_ZC may point anywhere inside a registered buffer, so one registration
 * serves every allocation and the kernel never pins pages per request.
 *
 * Plain C, no Python: the pool only hands out and takes back address ranges.
 * Who may free what, and when, is the caller's business (a range the kernel
 * may still read must not be given back; see ZeroCopyBuffer in dataplane.c).
 */
#ifndef URINGLOOP_BUFPOOL_H
#define URINGLOOP_BUFPOOL_H

#include <stddef.h>

struct bufpool_extent {
    size_t off, len;
};

struct bufpool {
    char *base;
    size_t size;      /* bytes mapped */
    size_t used;      /* bytes handed out */
    size_t page;
    struct bufpool_extent *free; /* free extents sorted by offset, never adjacent */
    size_t nfree, capfree;
};

/* Map size bytes (rounded up to pages). Returns 0, or -1 with errno set. */
int bufpool_init(struct bufpool *p, size_t size);

/* Unmap. Must only be called once nothing (kernel or user) uses the memory. */
void bufpool_destroy(struct bufpool *p);

/* A page-aligned range of at least len bytes (first fit), or NULL when no free
   extent is large enough (or the bookkeeping cannot grow). */
char *bufpool_alloc(struct bufpool *p, size_t len);

/* Give back a range bufpool_alloc returned for the same len. */
void bufpool_release(struct bufpool *p, char *ptr, size_t len);

/* Whether [ptr, ptr + len) lies inside the arena. */
int bufpool_contains(const struct bufpool *p, const char *ptr, size_t len);

#endif
