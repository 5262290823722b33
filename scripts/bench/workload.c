/* Benchmark workload for scripts/bench-process.sh.
 *
 *   workload MIB PIDFILE [SUMFILE [PROGRESSFILE]]
 *
 * Holds MIB MiB of anonymous memory: the first half pseudo-random (incompressible), the second half one
 * paragraph of text repeated (compresses to almost nothing). Every page is written, then the process writes
 * its PID to PIDFILE (atomically: the file appearing means "ready") and sleeps in a loop.
 * On SIGUSR1 it recomputes a checksum of the whole buffer and writes "<expected> <actual>" to SUMFILE, so the
 * benchmark can prove that restored copies kept their memory. All fds above 2 are closed first: CRIU dumps
 * every open fd, and the shell that starts us may leak some.
 * With WORKLOAD_PROCS=N in the environment (N > 1) the MIB are spread over a tree of N processes: the first
 * forks N-1 children, each holding MIB/N of its own (seeded by its index) and sleeping, and writes PIDFILE
 * once all of them have filled their memory; SUMFILE then covers the first process's memory only.
 * With PROGRESSFILE it does not sleep: it walks its pages one after another without end (one read a page),
 * counting every page it touched into the first 8 bytes of PROGRESSFILE, which it maps shared (so the count
 * can be read from outside, and goes on from the dumped value after a restore).
 * With WORKLOAD_WALK=random as well, the page read after N pages is a hash of N instead of page N: scattered
 * over the whole buffer, and the same sequence again after every restore of one checkpoint.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static volatile sig_atomic_t want_sum;

static void on_usr1(int sig) { (void)sig; want_sum = 1; }

/* SIGTERM ends it (as the init of a container, it would otherwise ignore the signal a stop sends first). */
static void on_term(int sig) { (void)sig; _exit(0); }

static uint64_t checksum(const uint64_t *p, size_t words) {
    uint64_t h = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < words; i++) h = (h ^ p[i]) * 0x100000001B3ull + (h >> 29);
    return h;
}

static void close_extra_fds(void) {
    int keep[64], n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) && n < 64) {
        int fd = atoi(e->d_name);
        if (fd > 2 && fd != dirfd(d)) keep[n++] = fd;
    }
    closedir(d);
    for (int i = 0; i < n; i++) close(keep[i]);
}

static int write_atomically(const char *path, const char *text) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return -1;
    fputs(text, f);
    if (fclose(f) != 0) return -1;
    return rename(tmp, path);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MIB PIDFILE [SUMFILE]\n", argv[0]);
        return 2;
    }
    close_extra_fds();
    size_t size = (size_t)atol(argv[1]) << 20;
    const char *procs_env = getenv("WORKLOAD_PROCS");
    int procs = procs_env ? atoi(procs_env) : 1, index = 0, ready[2] = {-1, -1};
    if (procs > 1) {
        size /= (size_t)procs;
        if (pipe(ready) != 0) { perror("pipe"); return 1; }
        for (int i = 1; i < procs; i++) {
            pid_t pid = fork();
            if (pid < 0) { perror("fork"); return 1; }
            if (pid == 0) { index = i; break; }
        }
    }
    size = size / 4096 * 4096;
    size_t half = size / 2;
    uint64_t *buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) { perror("mmap"); return 1; }
    /* fixed seed: every run holds the same bytes (each process of a tree its own) */
    uint64_t s = 0x2545F4914F6CDD1Dull ^ ((uint64_t)index * 0x9E3779B97F4A7C15ull);
    for (size_t i = 0; i < half / 8; i++) {
        s ^= s >> 12; s ^= s << 25; s ^= s >> 27;
        buf[i] = s * 0x2545F4914F6CDD1Dull;
    }
    static const char para[] =
        "Checkpoint and restore: CRIU freezes the tree, dumps its memory pages and kernel state into images, "
        "and later rebuilds the same processes with the same PIDs from those images.\n";
    char *text = (char *)buf + half;
    for (size_t off = 0; off < size - half; off += sizeof para - 1) {
        size_t n = size - half - off < sizeof para - 1 ? size - half - off : sizeof para - 1;
        memcpy(text + off, para, n);
    }
    uint64_t expected = checksum(buf, size / 8);
    signal(SIGUSR1, on_usr1);
    signal(SIGTERM, on_term);
    if (procs > 1) {
        char c = 1;
        if (index > 0) { /* a child: say it is ready, then hold its memory */
            if (write(ready[1], &c, 1) != 1) return 1;
            close(ready[0]);
            close(ready[1]);
            for (;;) pause();
        }
        close(ready[1]);
        for (int i = 1; i < procs; i++)
            if (read(ready[0], &c, 1) != 1) { fprintf(stderr, "a child of the tree died\n"); return 1; }
        close(ready[0]);
    }
    volatile uint64_t *progress = NULL;
    if (argc > 4) {
        int fd = open(argv[4], O_RDWR | O_CREAT, 0600);
        if (fd < 0 || ftruncate(fd, 4096) != 0) { perror(argv[4]); return 1; }
        progress = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (progress == MAP_FAILED) { perror("mmap progress"); return 1; }
        close(fd);
    }
    char line[64];
    snprintf(line, sizeof line, "%d\n", getpid());
    if (write_atomically(argv[2], line) != 0) { perror(argv[2]); return 1; }
    if (progress) {
        size_t pages = size / 4096;
        uint64_t touched = progress[0], acc = 0;
        const char *walk = getenv("WORKLOAD_WALK");
        int scattered = walk && strcmp(walk, "random") == 0;
        for (;;) {
            uint64_t page = touched;
            if (scattered) { /* splitmix64 of the count */
                page += 0x9E3779B97F4A7C15ull;
                page = (page ^ (page >> 30)) * 0xBF58476D1CE4E5B9ull;
                page = (page ^ (page >> 27)) * 0x94D049BB133111EBull;
                page ^= page >> 31;
            }
            acc += buf[(page % pages) * 512];
            progress[0] = ++touched;
            progress[1] = acc;
        }
    }
    for (;;) {
        sleep(1);
        if (want_sum && argc > 3) {
            want_sum = 0;
            char out[96];
            snprintf(out, sizeof out, "%016llx %016llx\n", (unsigned long long)expected,
                     (unsigned long long)checksum(buf, size / 8));
            write_atomically(argv[3], out);
        }
    }
}
