/* reaper CMD ARGS...: run CMD as a child subreaper and reap every orphan at once.
 *
 * CRIU kills a dumped process, and `criu restore -d` leaves the restored process orphaned; here PID 1 reaps
 * orphans only every ~1.5 s, so a dumped PID stays a zombie and cannot be restored into. Under this reaper
 * the zombies are ours and go away immediately. Exits with CMD's status; SIGINT/SIGTERM/SIGHUP are passed on.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

static pid_t child;

static void forward(int sig) { if (child > 0) kill(child, sig); }

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s CMD [ARGS...]\n", argv[0]); return 2; }
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0) { perror("PR_SET_CHILD_SUBREAPER"); return 1; }
    child = fork();
    if (child < 0) { perror("fork"); return 1; }
    if (child == 0) {
        execvp(argv[1], argv + 1);
        perror(argv[1]);
        _exit(127);
    }
    struct sigaction sa = { .sa_handler = forward };
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    for (;;) {
        int status;
        pid_t p = waitpid(-1, &status, 0);
        if (p < 0) {
            if (errno == EINTR) continue;
            return 1; /* no children left: cannot happen before CMD exits */
        }
        if (p == child) {
            /* Orphans left behind (a workload restored by the last run) are reparented to PID 1 when we exit. */
            if (WIFEXITED(status)) return WEXITSTATUS(status);
            return 128 + WTERMSIG(status);
        }
    }
}
