/* Four worker threads count; the main thread prints "tick T c0 c1 c2 c3" every 20 ms. */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static volatile long counters[4];

static void *work(void *arg) {
    long idx = (long)arg;
    for (;;) {
        counters[idx]++;
        usleep(5000);
    }
    return NULL;
}

int main(void) {
    pthread_t t[4];
    for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, work, (void *)i);
    char line[160];
    for (long tick = 1;; tick++) {
        int n = snprintf(line, sizeof line, "tick %ld %ld %ld %ld %ld\n", tick, counters[0], counters[1], counters[2], counters[3]);
        if (write(1, line, n) != n) return 3;
        usleep(20000);
    }
}
