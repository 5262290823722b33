/*
 * A fake CUDA program for the fake libcuda.so.1: gpu-app <MiB of device memory> [children]
 *
 * Forks `children` child processes first (each its own CUDA process doing the same), then cuInit,
 * allocates the device memory and loops forever: every ~100 ms one unit of GPU work (a kernel that
 * increments a counter kept in device memory and rewrites the whole buffer from it), copies the buffer
 * back, checks it word by word and prints, in one write:
 *     count <n> sum <FNV-1a of the buffer's 64-bit words, 16 hex digits> pid <pid>
 * A wrong buffer or a counter that did not advance by one prints "CORRUPT ..." and exits 3; a CUDA error
 * exits 4; a parent whose child died exits 5. Needs FAKE_CUDA_DEVICE (see libcuda.c).
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* From the fake libcuda.so.1. */
int cuInit(unsigned int flags);
int cuGetErrorName(int err, const char **str);
int fakeMemAlloc(void **dptr, size_t bytes);
int fakeMemcpyHtoD(void *dst, const void *src, size_t n);
int fakeMemcpyDtoH(void *dst, const void *src, size_t n);
int fakeLaunchIncrement(void *dptr, size_t bytes);
void fakeExitCleanup(void);

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 1) n = sizeof line - 1;
    if (write(1, line, n) != n) _exit(6); /* one write per line: processes sharing the log do not mix */
}

static void check(int rc, const char *what) {
    if (rc == 0) return;
    const char *name = "?";
    cuGetErrorName(rc, &name);
    say("CUDA error in %s: %s (%d) pid %d\n", what, name, rc, (int)getpid());
    exit(4);
}

/* What word i of the buffer holds after the counter reached n. */
static uint64_t expected(uint64_t n, size_t i) { return i == 0 ? n : (n << 32) ^ (i * 0x9E3779B97F4A7C15ULL); }

static void on_signal(int sig) {
    fakeExitCleanup();
    signal(sig, SIG_DFL);
    raise(sig);
}

static void run(size_t bytes, int children) {
    size_t words = bytes / 8;
    uint64_t *host = malloc(bytes);
    void *dev;
    if (!host) exit(2);
    check(cuInit(0), "cuInit");
    check(fakeMemAlloc(&dev, bytes), "fakeMemAlloc");
    for (size_t i = 0; i < words; i++) host[i] = expected(0, i);
    check(fakeMemcpyHtoD(dev, host, bytes), "fakeMemcpyHtoD");

    for (uint64_t prev = 0;; prev++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        check(fakeLaunchIncrement(dev, bytes), "fakeLaunchIncrement");
        check(fakeMemcpyDtoH(host, dev, bytes), "fakeMemcpyDtoH");
        uint64_t n = host[0], sum = 0xcbf29ce484222325ULL;
        if (n != prev + 1) {
            say("CORRUPT count %llu after %llu pid %d\n", (unsigned long long)n, (unsigned long long)prev, (int)getpid());
            exit(3);
        }
        for (size_t i = 0; i < words; i++) {
            if (host[i] != expected(n, i)) {
                say("CORRUPT word %zu count %llu pid %d\n", i, (unsigned long long)n, (int)getpid());
                exit(3);
            }
            sum = (sum ^ host[i]) * 0x100000001b3ULL;
        }
        say("count %llu sum %016llx pid %d\n", (unsigned long long)n, (unsigned long long)sum, (int)getpid());

        if (children > 0) {
            int status;
            pid_t dead = waitpid(-1, &status, WNOHANG);
            if (dead > 0) {
                say("child %d exited (status %d) pid %d\n", (int)dead, status, (int)getpid());
                exit(5);
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        long spent = (t1.tv_sec - t0.tv_sec) * 1000L + (t1.tv_nsec - t0.tv_nsec) / 1000000L;
        if (spent < 100) usleep((useconds_t)(100 - spent) * 1000);
    }
}

int main(int argc, char **argv) {
    if (argc < 2 || atol(argv[1]) <= 0) {
        fprintf(stderr, "usage: %s <MiB of device memory> [children]\n", argv[0]);
        return 2;
    }
    if (!getenv("FAKE_CUDA_DEVICE")) {
        fprintf(stderr, "%s: FAKE_CUDA_DEVICE is not set\n", argv[0]);
        return 2;
    }
    size_t bytes = (size_t)atol(argv[1]) << 20;
    int children = argc > 2 ? atoi(argv[2]) : 0;
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGHUP, on_signal);
    for (int c = 0; c < children; c++) {
        pid_t pid = fork();
        if (pid < 0) return 2;
        if (pid == 0) {
            run(bytes, 0);
        }
    }
    run(bytes, children);
}
