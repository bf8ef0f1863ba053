// Does growing a large malloc'd buffer copy it? glibc with M_MMAP_THRESHOLD fixed at 128 KiB
// (as the gateway sets it): realloc of an mmapped chunk is mremap (page tables move, no copy).
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    if (argc > 1) mallopt(M_MMAP_THRESHOLD, 128 * 1024);
    size_t mib = 1 << 20;
    for (int round = 0; round < 3; round++) {
        size_t size = 48 * mib;
        char *p = malloc(size);
        memset(p, 1, size);
        double t0 = now();
        int moved = 0;
        // Double three times: 48 -> 96 -> 192 -> 384 MiB, as a 48 MiB compressed message of
        // 8x compressible JSON would grow; only the first 48 MiB are written.
        for (int i = 0; i < 3; i++) {
            char *q = realloc(p, size * 2);
            moved += q != p;
            p = q;
            size *= 2;
        }
        double grow = now() - t0;
        char *c = malloc(48 * mib);
        t0 = now();
        memcpy(c, p, 48 * mib);
        double copy = now() - t0;
        printf("%s: 3 doublings from 48 MiB (touched): %.3f ms (moved %d times); one memcpy of 48 MiB into a faulted-in buffer: %.3f ms; check %d\n",
               argc > 1 ? "mmap_threshold=128KiB" : "glibc defaults", grow * 1e3, moved, copy * 1e3, c[12345] + p[size / 4]);
        free(p); free(c);
    }
    return 0;
}
