/* A pod sandbox's init (the "pause" container): holds the pod's namespaces open and does nothing. It sleeps
 * until SIGTERM or SIGINT (then exits 0), and reaps any child that is reparented to it (it is PID 1 of a
 * shared PID namespace). Built with `gcc -static` into the tests' pause image, which has no libc. */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_stop(int sig) {
    (void)sig;
    stop = 1;
}

static void on_child(int sig) {
    (void)sig;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

static void handle(int sig, void (*fn)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = sig == SIGCHLD ? SA_NOCLDSTOP | SA_RESTART : 0;
    sigaction(sig, &sa, NULL);
}

int main(void) {
    handle(SIGTERM, on_stop);
    handle(SIGINT, on_stop);
    handle(SIGCHLD, on_child);
    /* Block the signals between the test of `stop` and the wait, so none is lost. */
    sigset_t all, old;
    sigemptyset(&all);
    sigaddset(&all, SIGTERM);
    sigaddset(&all, SIGINT);
    sigaddset(&all, SIGCHLD);
    sigprocmask(SIG_BLOCK, &all, &old);
    while (!stop)
        sigsuspend(&old);
    return 0;
}
