/* Fills N MiB (arg 1, default 256) from a fixed seed, prints "sum HEX"; prints it again, recomputed from
 * memory, on every SIGUSR1. A restore that lost or changed a page prints another sum.
 * On SIGUSR2 it changes its memory map the ways a lazy restore's handler must follow, touching as little of
 * it as it can meanwhile: it forks a child that prints the sum of its copy ("sum HEX"); meanwhile it moves
 * the buffer elsewhere with mremap and drops its last MiB with madvise(MADV_DONTNEED) (saved first, put back
 * after checking that it read as zeros); once the child is done it prints the moved buffer's sum and
 * "zeros ok" ("zeros bad" if the dropped MiB did not read as zeros). */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t asked, reshape;
static void on_usr1(int sig) { (void)sig; asked = 1; }
static void on_usr2(int sig) { (void)sig; reshape = 1; }

static uint64_t sum(const uint64_t *buf, size_t words) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < words; i++) h = (h ^ buf[i]) * 1099511628211ULL;
    return h;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 256;
    size_t words = mib * 1024 * 1024 / 8;
    size_t len = words * 8;
    uint64_t *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) return 2;
    uint64_t x = 0x9E3779B97F4A7C15ULL;
    for (size_t i = 0; i < words; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        buf[i] = (i % 1024 < 512) ? x : 0x2065687420666f20ULL; /* half random, half text */
    }
    signal(SIGUSR1, on_usr1);
    signal(SIGUSR2, on_usr2);
    char line[64];
    int n = snprintf(line, sizeof line, "sum %016llx\n", (unsigned long long)sum(buf, words));
    if (write(1, line, n) != n) return 3;
    for (;;) {
        usleep(20000);
        if (asked) {
            asked = 0;
            n = snprintf(line, sizeof line, "sum %016llx\n", (unsigned long long)sum(buf, words));
            if (write(1, line, n) != n) return 3;
        }
        if (reshape) {
            reshape = 0;
            pid_t child = fork();
            if (child == 0) {
                n = snprintf(line, sizeof line, "sum %016llx\n", (unsigned long long)sum(buf, words));
                _exit(write(1, line, n) == n ? 0 : 3);
            }
            if (child < 0) return 4;
            void *to = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (to == MAP_FAILED) return 4;
            buf = mremap(buf, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to);
            if (buf == MAP_FAILED) return 4;
            size_t mib1 = 1 << 20, tail = len - mib1;
            char *saved = malloc(mib1);
            if (!saved) return 2;
            memcpy(saved, (char *)buf + tail, mib1);
            if (madvise((char *)buf + tail, mib1, MADV_DONTNEED) != 0) return 4;
            int zeros = 1;
            for (size_t i = 0; i < mib1; i++) zeros &= ((char *)buf)[tail + i] == 0;
            memcpy((char *)buf + tail, saved, mib1);
            free(saved);
            if (waitpid(child, NULL, 0) != child) return 4;
            n = snprintf(line, sizeof line, "sum %016llx\nzeros %s\n", (unsigned long long)sum(buf, words), zeros ? "ok" : "bad");
            if (write(1, line, n) != n) return 3;
        }
    }
}
