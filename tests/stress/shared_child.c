/*
 * A program of its own that attaches a shared engine's file, for
 * tests/stress/test_shared_stress.c: it maps the file once anywhere to
 * learn where the engine was made, maps it again there, hits one key and
 * prints how many of its hits were admitted.
 *
 *   shared_child PATH LENGTH KEY TRIES
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "tally.h"

#define T0 (UINT64_C(1700000000) * UINT64_C(1000000000))

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s PATH LENGTH KEY TRIES\n", argv[0]);
        return 2;
    }
    size_t len = strtoull(argv[2], NULL, 10);
    int tries = atoi(argv[4]);
    int fd = open(argv[1], O_RDWR);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    void *look = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    void *at = NULL;
    if (look == MAP_FAILED || tally_shared_address(look, len, &at) != 0) {
        fprintf(stderr, "%s: not a shared engine\n", argv[1]);
        return 1;
    }
    munmap(look, len);
    void *m = mmap(at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, 0);
    close(fd);
    tally_engine *e;
    const char *why = NULL;
    if (m != at || tally_shared_check(m, len, &why) != 0 || tally_shared_attach(m, len, &e) != 0) {
        fprintf(stderr, "cannot attach at %p: %s\n", at, why ? why : "address taken");
        return 1;
    }
    uint64_t admitted = 0;
    for (int i = 0; i < tries; i++) {
        tally_result r;
        if (tally_hit_at(e, 0, argv[3], strlen(argv[3]), NULL, T0, &r) != 0)
            return 1;
        admitted += r.allowed;
    }
    printf("%" PRIu64 "\n", admitted);
    tally_shared_detach(e);
    munmap(m, len);
    return 0;
}
