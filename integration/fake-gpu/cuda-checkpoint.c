/*
 * Fake cuda-checkpoint: NVIDIA's utility's command line over the fake libcuda.so.1's checkpoint API
 * (the real tool is a thin wrapper over the driver's cuCheckpointProcess* functions too).
 *
 *   cuda-checkpoint --get-state --pid <pid>
 *   cuda-checkpoint --action lock|checkpoint|restore|unlock --pid <pid> [--timeout <ms>]
 *   cuda-checkpoint --get-restore-tid --pid <pid>
 *   cuda-checkpoint --toggle --pid <pid>
 *   cuda-checkpoint --help
 *
 * Success: exit 0 (get-state and get-restore-tid print one line). Failure: a message on stderr naming the
 * pid and the CUDA error, exit 1.
 */
#define _GNU_SOURCE
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    unsigned int timeoutMs;
    unsigned int reserved0;
    unsigned long long reserved1[7];
} CUcheckpointLockArgs;
typedef struct {
    unsigned long long reserved[8];
} CUcheckpointArgs; /* Checkpoint, Restore and Unlock args have this layout */

int cuInit(unsigned int flags);
int cuGetErrorName(int err, const char **str);
int cuGetErrorString(int err, const char **str);
int cuCheckpointProcessGetState(int pid, int *state);
int cuCheckpointProcessGetRestoreThreadId(int pid, int *tid);
int cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args);
int cuCheckpointProcessCheckpoint(int pid, CUcheckpointArgs *args);
int cuCheckpointProcessRestore(int pid, CUcheckpointArgs *args);
int cuCheckpointProcessUnlock(int pid, CUcheckpointArgs *args);
const char *fakeLastErrorMessage(void);

static const char *const STATES[] = {"running", "locked", "checkpointed", "failed"};

static const char USAGE[] =
    "CUDA checkpoint and restore utility (fake, for tests without a GPU).\n"
    "Toggles the state of CUDA within a process between suspended and running.\n"
    "\n"
    "    --get-state --pid <pid>\n"
    "        Print the CUDA state of the process: running, locked, checkpointed or failed.\n"
    "\n"
    "    --action <lock|checkpoint|restore|unlock> --pid <pid> [--timeout <ms>]\n"
    "        Perform one transition: lock (running -> locked, waiting for work in flight; a --timeout\n"
    "        of 0 or none waits forever), checkpoint (locked -> checkpointed: device memory moved to host\n"
    "        memory, device released), restore (checkpointed -> locked), unlock (locked -> running).\n"
    "\n"
    "    --get-restore-tid --pid <pid>\n"
    "        Print the TID of the process's CUDA restore thread.\n"
    "\n"
    "    --toggle --pid <pid>\n"
    "        running -> checkpointed (lock and checkpoint), checkpointed -> running (restore and unlock).\n"
    "\n"
    "    --help, -h\n"
    "        Print this help.\n"
    "\n"
    "Short options: -p <pid>, -t <ms>.\n";

static int pid_arg;

/* Report a failed CUDA call; returns the exit status (1). */
static int failed(const char *what, int rc) {
    const char *name = "CUDA_ERROR_UNKNOWN", *text = "unknown error", *detail = fakeLastErrorMessage();
    cuGetErrorName(rc, &name);
    cuGetErrorString(rc, &text);
    fprintf(stderr, "cuda-checkpoint: %s failed for pid %d: %s (%d): %s%s%s\n", what, pid_arg, name, rc, text,
            detail && *detail ? ": " : "", detail ? detail : "");
    return 1;
}

static int parse_uint(const char *s, const char *what, long max) {
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < 0 || v > max) {
        fprintf(stderr, "cuda-checkpoint: invalid %s '%s'\n", what, s);
        exit(1);
    }
    return (int)v;
}

static int action(const char *name, unsigned timeout_ms) {
    int rc;
    if (!strcmp(name, "lock")) {
        CUcheckpointLockArgs args = {.timeoutMs = timeout_ms};
        rc = cuCheckpointProcessLock(pid_arg, &args);
    } else if (!strcmp(name, "checkpoint")) {
        CUcheckpointArgs args = {{0}};
        rc = cuCheckpointProcessCheckpoint(pid_arg, &args);
    } else if (!strcmp(name, "restore")) {
        CUcheckpointArgs args = {{0}};
        /* The driver needs initialising in the restoring process; the tool has no device context of its own. */
        unsetenv("FAKE_CUDA_DEVICE");
        rc = cuInit(0);
        if (rc) return failed("cuInit", rc);
        rc = cuCheckpointProcessRestore(pid_arg, &args);
    } else if (!strcmp(name, "unlock")) {
        CUcheckpointArgs args = {{0}};
        rc = cuCheckpointProcessUnlock(pid_arg, &args);
    } else {
        fprintf(stderr, "cuda-checkpoint: unknown action '%s' (lock, checkpoint, restore or unlock)\n", name);
        return 1;
    }
    return rc ? failed(name, rc) : 0;
}

int main(int argc, char **argv) {
    enum { NONE, GET_STATE, ACTION, RESTORE_TID, TOGGLE } mode = NONE;
    const char *act = NULL;
    int have_pid = 0, modes = 0;
    unsigned timeout = 0;
    static const struct option opts[] = {
        {"get-state", no_argument, 0, 's'},   {"action", required_argument, 0, 'a'},
        {"get-restore-tid", no_argument, 0, 'r'}, {"toggle", no_argument, 0, 'g'},
        {"pid", required_argument, 0, 'p'},   {"timeout", required_argument, 0, 't'},
        {"help", no_argument, 0, 'h'},        {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "p:t:h", opts, NULL)) != -1) {
        switch (c) {
        case 's': mode = GET_STATE, modes++; break;
        case 'a': mode = ACTION, act = optarg, modes++; break;
        case 'r': mode = RESTORE_TID, modes++; break;
        case 'g': mode = TOGGLE, modes++; break;
        case 'p': pid_arg = parse_uint(optarg, "pid", 0x7fffffff), have_pid = 1; break;
        case 't': timeout = (unsigned)parse_uint(optarg, "timeout", 0x7fffffff); break;
        case 'h': fputs(USAGE, stdout); return 0;
        default: fputs(USAGE, stderr); return 1;
        }
    }
    if (optind < argc || modes != 1 || !have_pid) {
        fprintf(stderr, "cuda-checkpoint: %s\n\n%s",
                optind < argc ? "unexpected argument" : modes != 1 ? "give exactly one of --get-state, --action, "
                                                                     "--get-restore-tid, --toggle" : "--pid is required",
                USAGE);
        return 1;
    }
    int rc, state, tid;
    switch (mode) {
    case GET_STATE:
        rc = cuCheckpointProcessGetState(pid_arg, &state);
        if (rc) return failed("get-state", rc);
        printf("%s\n", state >= 0 && state < 4 ? STATES[state] : "unknown");
        return 0;
    case RESTORE_TID:
        rc = cuCheckpointProcessGetRestoreThreadId(pid_arg, &tid);
        if (rc) return failed("get-restore-tid", rc);
        printf("%d\n", tid);
        return 0;
    case ACTION:
        return action(act, timeout);
    case TOGGLE:
        rc = cuCheckpointProcessGetState(pid_arg, &state);
        if (rc) return failed("get-state", rc);
        if (state == 0) {
            if ((rc = action("lock", timeout))) return rc;
            if ((rc = action("checkpoint", 0))) {
                action("unlock", 0); /* back to running, as before the toggle */
                return rc;
            }
            return 0;
        }
        if (state == 2) return action("restore", 0) || action("unlock", 0);
        fprintf(stderr, "cuda-checkpoint: toggle failed for pid %d: CUDA_ERROR_ILLEGAL_STATE (401): the process is %s\n",
                pid_arg, state >= 0 && state < 4 ? STATES[state] : "unknown");
        return 1;
    default:
        return 1;
    }
}
