/* Samples a workload's page count (the first 8 bytes of its PROGRESSFILE, see workload.c) for scripts/bench-lazy.sh.
 *
 *   progress PROGRESSFILE MS
 *
 * Prints "<ms since start> <count>" every 2 ms for MS milliseconds.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s PROGRESSFILE MS\n", argv[0]);
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) { perror(argv[1]); return 1; }
    double start = now_ms(), until = start + atof(argv[2]);
    for (double t = start; t < until; t = now_ms()) {
        uint64_t count = 0;
        if (pread(fd, &count, sizeof count, 0) != sizeof count) count = 0;
        printf("%.2f %llu\n", t - start, (unsigned long long)count);
        usleep(2000);
    }
    return 0;
}
