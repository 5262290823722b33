/* Fills N MiB (arg 1, default 256) from a fixed seed, prints "sum HEX"; prints it again, recomputed from
 * memory, on every SIGUSR1. A restore that lost or changed a page prints another sum. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static volatile sig_atomic_t asked;
static void on_usr1(int sig) { (void)sig; asked = 1; }

static uint64_t sum(const uint64_t *buf, size_t words) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < words; i++) h = (h ^ buf[i]) * 1099511628211ULL;
    return h;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 256;
    size_t words = mib * 1024 * 1024 / 8;
    uint64_t *buf = malloc(words * 8);
    if (!buf) return 2;
    uint64_t x = 0x9E3779B97F4A7C15ULL;
    for (size_t i = 0; i < words; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        buf[i] = (i % 1024 < 512) ? x : 0x2065687420666f20ULL; /* half random, half text */
    }
    signal(SIGUSR1, on_usr1);
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
    }
}
