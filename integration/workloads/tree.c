/* A parent and a child joined by a pipe: the child sends 1, 2, 3, ...; the parent prints what it receives. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    int p[2];
    if (pipe(p) != 0) return 2;
    pid_t child = fork();
    if (child < 0) return 2;
    if (child == 0) {
        close(p[0]);
        for (long i = 1;; i++) {
            if (write(p[1], &i, sizeof i) != sizeof i) return 3;
            usleep(20000);
        }
    }
    close(p[1]);
    char line[64];
    for (;;) {
        long v;
        if (read(p[0], &v, sizeof v) != sizeof v) return 4;
        int n = snprintf(line, sizeof line, "got %ld from %d\n", v, (int)child);
        if (write(1, line, n) != n) return 3;
    }
}
