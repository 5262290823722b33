/*
 * Fake libcuda.so.1: the CUDA checkpoint driver API of NVIDIA's r570+ driver, without a GPU.
 * See README.md beside this file for what it mirrors and what it does not.
 *
 * Two roles, in one library like the real driver:
 *
 *  - Application ("target") side. cuInit(0) in a process whose environment has FAKE_CUDA_DEVICE opens
 *    that character device (kept open, like /dev/nvidia0) and starts the driver's "restore thread".
 *    The app allocates "device memory" (MAP_SHARED mappings of the device) and works on it only through
 *    the calls below, which block while the process is LOCKED, CHECKPOINTED or FAILED:
 *
 *      int fakeMemAlloc(void **dptr, size_t bytes);              like cuMemAlloc
 *      int fakeMemFree(void *dptr);                              like cuMemFree
 *      int fakeMemcpyHtoD(void *dst, const void *src, size_t n); like cuMemcpyHtoD (synchronous)
 *      int fakeMemcpyDtoH(void *dst, const void *src, size_t n); like cuMemcpyDtoH (synchronous)
 *      int fakeLaunchIncrement(void *dptr, size_t bytes);        a "kernel", synchronous: the buffer is
 *          64-bit words; word 0 is a counter, incremented; word i (i >= 1) becomes
 *          (counter << 32) ^ (i * 0x9E3779B97F4A7C15). Takes FAKE_CUDA_BUSY_MS longer (in flight).
 *      void fakeExitCleanup(void);                               async-signal-safe: remove this
 *          process's control files (for an app's SIGTERM handler; a normal exit does it by itself)
 *
 *  - Controller side: cuCheckpointProcess{GetState,GetRestoreThreadId,Lock,Checkpoint,Restore,Unlock}
 *    on another PID (host PID, or any thread of it) ask that process's restore thread through plain files
 *    in its control directory (FAKE_CUDA_DIR in the target's environment, default /tmp/fake-cuda), seen
 *    through /proc/<pid>/root so that containers work. The target holds no descriptor for this channel.
 *
 * Control protocol (N = the target's PID in its own PID namespace; all files written tmp + rename):
 *    N.state  target: "running" | "locked" | "checkpointed" | "failed", newline
 *    N.tid    target: the restore thread's TID (target's namespace), newline
 *    N.req    controller: "<id> <action> <timeout_ms> <fail 0|1> <delay_ms>", newline; action is one of
 *             lock, checkpoint, restore, unlock, get-state. The target reads, then deletes it.
 *    N.ack    target: "<id> <CUresult> <state> <message...>", newline. The controller deletes it.
 *    N.lock   controllers only: flock()ed around a request, so that requests to one process serialise.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* CUresult values, as in cuda.h. */
enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_OPERATING_SYSTEM = 304,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_TIMEOUT = 909,
    CUDA_ERROR_UNKNOWN = 999,
};

typedef enum {
    CU_PROCESS_STATE_RUNNING = 0,
    CU_PROCESS_STATE_LOCKED = 1,
    CU_PROCESS_STATE_CHECKPOINTED = 2,
    CU_PROCESS_STATE_FAILED = 3,
} CUprocessState;

typedef struct {
    unsigned int timeoutMs;
    unsigned int reserved0;
    unsigned long long reserved1[7];
} CUcheckpointLockArgs;
typedef struct {
    unsigned long long reserved[8];
} CUcheckpointCheckpointArgs;
typedef struct {
    char bytes[16];
} CUuuid;
typedef struct {
    CUuuid oldUuid;
    CUuuid newUuid;
} CUcheckpointGpuPair;
/* The layout of CUDA 12.9+: gpuPairs at offset 0, gpuPairsCount at 8, the rest reserved (64 bytes). In CUDA
 * 12.8 all of it was reserved; the fake follows the caller's FAKE_CUDA_DRIVER_VERSION. */
typedef struct {
    CUcheckpointGpuPair *gpuPairs;
    unsigned int gpuPairsCount;
    char reserved[52 - sizeof(CUcheckpointGpuPair *)];
    unsigned long long reserved1;
} CUcheckpointRestoreArgs;
typedef struct {
    unsigned long long reserved[8];
} CUcheckpointUnlockArgs;

static const struct {
    int code;
    const char *name, *text;
} ERRORS[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_OPERATING_SYSTEM, "CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_TIMEOUT, "CUDA_ERROR_TIMEOUT", "the operation timed out"},
    {CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

static const char *const STATE_NAMES[] = {"running", "locked", "checkpointed", "failed"};

#define DEFAULT_DIR "/tmp/fake-cuda"
#define MAX_ALLOCS 64
#define POLL_NS 1000000L /* the restore thread looks for requests every 1 ms */

static long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000L + t.tv_nsec / 1000000L;
}

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) == -1 && errno == EINTR) {
    }
}

static long env_long(const char *name, long dflt) {
    const char *v = getenv(name);
    char *end;
    if (!v || !*v) return dflt;
    long n = strtol(v, &end, 10);
    return *end ? dflt : n;
}

/* The last error's explanation (per thread), for the cuda-checkpoint tool. */
static __thread char last_message[512];

static int fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_message, sizeof last_message, fmt, ap);
    va_end(ap);
    return code;
}

EXPORT const char *fakeLastErrorMessage(void) { return last_message; }

EXPORT int cuGetErrorName(int err, const char **str) {
    if (!str) return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof ERRORS / sizeof ERRORS[0]; i++)
        if (ERRORS[i].code == err) return *str = ERRORS[i].name, CUDA_SUCCESS;
    *str = NULL;
    return CUDA_ERROR_INVALID_VALUE;
}

EXPORT int cuGetErrorString(int err, const char **str) {
    if (!str) return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof ERRORS / sizeof ERRORS[0]; i++)
        if (ERRORS[i].code == err) return *str = ERRORS[i].text, CUDA_SUCCESS;
    *str = NULL;
    return CUDA_ERROR_INVALID_VALUE;
}

EXPORT int cuDriverGetVersion(int *version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    *version = (int)env_long("FAKE_CUDA_DRIVER_VERSION", 12080);
    return CUDA_SUCCESS;
}

/* Write `text` to `path` atomically (tmp + rename); 0 or -1. */
static int write_atomic(const char *path, const char *tmp, const char *text) {
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    size_t len = strlen(text);
    ssize_t n = write(fd, text, len);
    close(fd);
    if (n != (ssize_t)len || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* Read at most size-1 bytes of `path` into buf (NUL-terminated); bytes read or -1. */
static ssize_t read_small(const char *path, char *buf, size_t size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n < 0) return -1;
    buf[n] = 0;
    return n;
}

/* ------------------------------------------------------------------------------------------------ */
/* Target side: the process's CUDA state, its device memory and its restore thread.                 */
/* ------------------------------------------------------------------------------------------------ */

struct alloc {
    void *addr;  /* device address: the same before and after a checkpoint */
    size_t size;
    void *host;  /* the host copy while checkpointed, else NULL */
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv;           /* state, inflight or lock_pending changed (CLOCK_MONOTONIC) */
static pthread_once_t cv_once = PTHREAD_ONCE_INIT;
static int initialized;             /* cuInit succeeded in this process */
static int is_app;                  /* ... with a device: this is a CUDA process */
static pid_t owner;                 /* getpid() at cuInit (a forked child is not initialised) */
static CUprocessState state = CU_PROCESS_STATE_RUNNING;
static int lock_pending;            /* a lock waits for in-flight work: new work must wait */
static int inflight;                /* app calls touching device memory right now */
static int dev_fd = -1;
static char dev_path[PATH_MAX];
static long busy_ms;
static struct alloc allocs[MAX_ALLOCS];
static int nallocs;
static pid_t restore_tid;
static atomic_int exiting;
static char gpu_uuid[64];           /* the GPU this process uses (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx) */

/* Control files of this process (precomputed so that fakeExitCleanup is async-signal-safe). */
static char f_state[PATH_MAX], f_state_tmp[PATH_MAX + 8], f_tid[PATH_MAX], f_tid_tmp[PATH_MAX + 8], f_req[PATH_MAX],
    f_ack[PATH_MAX], f_ack_tmp[PATH_MAX + 8], f_lock[PATH_MAX], f_gpu[PATH_MAX], f_gpu_tmp[PATH_MAX + 8];

static void cv_init(void) {
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&cv, &a);
    pthread_condattr_destroy(&a);
}

/* Publish the state (and the restore thread's TID). Called with mu held. */
static void publish_state(void) {
    char buf[32];
    if (atomic_load(&exiting)) return;
    snprintf(buf, sizeof buf, "%s\n", STATE_NAMES[state]);
    write_atomic(f_state, f_state_tmp, buf);
    snprintf(buf, sizeof buf, "%d\n", (int)restore_tid);
    write_atomic(f_tid, f_tid_tmp, buf);
    char gbuf[80];
    snprintf(gbuf, sizeof gbuf, "%s\n", gpu_uuid);
    write_atomic(f_gpu, f_gpu_tmp, gbuf);
}

EXPORT void fakeExitCleanup(void) {
    atomic_store(&exiting, 1);
    if (!f_state[0]) return;
    const char *files[] = {f_state, f_state_tmp, f_tid, f_tid_tmp, f_req, f_ack, f_ack_tmp, f_lock, f_gpu, f_gpu_tmp};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) unlink(files[i]);
}

static void cleanup_at_exit(void) {
    if (is_app && owner == getpid()) {
        pthread_mutex_lock(&mu);
        fakeExitCleanup();
        pthread_mutex_unlock(&mu);
    }
}

/* fork(): the child is not a CUDA process (as with the real driver, CUDA does not survive fork). */
static void atfork_prepare(void) { pthread_mutex_lock(&mu); }
static void atfork_parent(void) { pthread_mutex_unlock(&mu); }
static void atfork_child(void) {
    pthread_mutex_init(&mu, NULL);
    if (dev_fd >= 0) close(dev_fd);
    dev_fd = -1;
    for (int i = 0; i < nallocs; i++) {
        munmap(allocs[i].addr, allocs[i].size);
        if (allocs[i].host) munmap(allocs[i].host, allocs[i].size);
    }
    nallocs = 0;
    initialized = is_app = 0;
    state = CU_PROCESS_STATE_RUNNING;
    inflight = lock_pending = 0;
    f_state[0] = 0;
}

/* The transitions, run by the restore thread with mu held. Each returns a CUresult and sets last_message. */

static int do_lock(unsigned timeout_ms, int injected) {
    if (state != CU_PROCESS_STATE_RUNNING)
        return fail(CUDA_ERROR_ILLEGAL_STATE, "lock: the process is %s, not running", STATE_NAMES[state]);
    if (injected) return fail(CUDA_ERROR_UNKNOWN, "lock: injected failure (FAKE_CUDA_FAIL)");
    lock_pending = 1; /* new work waits from now on; work in flight must complete */
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) deadline.tv_sec++, deadline.tv_nsec -= 1000000000L;
    while (inflight > 0) {
        int rc = timeout_ms ? pthread_cond_timedwait(&cv, &mu, &deadline) : pthread_cond_wait(&cv, &mu);
        if (rc == ETIMEDOUT && inflight > 0) {
            lock_pending = 0;
            pthread_cond_broadcast(&cv);
            return fail(CUDA_ERROR_TIMEOUT, "lock: work still in flight after %u ms", timeout_ms);
        }
    }
    lock_pending = 0;
    state = CU_PROCESS_STATE_LOCKED;
    return CUDA_SUCCESS;
}

/* Copy device memory to host memory, leave only PROT_NONE reservations at the device addresses, close
 * the device: nothing refers to the GPU any more, so CRIU can dump the process. */
static int do_checkpoint(int injected) {
    if (state != CU_PROCESS_STATE_LOCKED)
        return fail(CUDA_ERROR_ILLEGAL_STATE, "checkpoint: the process is %s, not locked", STATE_NAMES[state]);
    if (injected) return fail(CUDA_ERROR_UNKNOWN, "checkpoint: injected failure (FAKE_CUDA_FAIL)");
    for (int i = 0; i < nallocs; i++) {
        void *h = mmap(NULL, allocs[i].size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (h == MAP_FAILED) {
            int e = errno;
            for (int j = 0; j < i; j++) munmap(allocs[j].host, allocs[j].size), allocs[j].host = NULL;
            return fail(CUDA_ERROR_OUT_OF_MEMORY, "checkpoint: no host memory for %zu bytes: %s", allocs[i].size,
                        strerror(e));
        }
        memcpy(h, allocs[i].addr, allocs[i].size);
        allocs[i].host = h;
    }
    for (int i = 0; i < nallocs; i++)
        mmap(allocs[i].addr, allocs[i].size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    close(dev_fd);
    dev_fd = -1;
    state = CU_PROCESS_STATE_CHECKPOINTED;
    return CUDA_SUCCESS;
}

/* Reopen the device, map device memory back at the same addresses, copy the host copies in. */
static int do_restore(int injected, const char *onto) {
    if (state != CU_PROCESS_STATE_CHECKPOINTED)
        return fail(CUDA_ERROR_ILLEGAL_STATE, "restore: the process is %s, not checkpointed", STATE_NAMES[state]);
    state = CU_PROCESS_STATE_FAILED; /* until it worked */
    if (injected) return fail(CUDA_ERROR_UNKNOWN, "restore: injected failure (FAKE_CUDA_FAIL)");
    if (onto[0] && strcmp(onto, "-")) snprintf(gpu_uuid, sizeof gpu_uuid, "%s", onto);
    dev_fd = open(dev_path, O_RDWR | O_CLOEXEC);
    if (dev_fd < 0) return fail(CUDA_ERROR_UNKNOWN, "restore: cannot reopen %s: %s", dev_path, strerror(errno));
    for (int i = 0; i < nallocs; i++) {
        void *p = mmap(allocs[i].addr, allocs[i].size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, dev_fd, 0);
        if (p != allocs[i].addr)
            return fail(CUDA_ERROR_UNKNOWN, "restore: cannot map device memory at %p: %s", allocs[i].addr,
                        strerror(errno));
        memcpy(p, allocs[i].host, allocs[i].size);
        munmap(allocs[i].host, allocs[i].size);
        allocs[i].host = NULL;
    }
    state = CU_PROCESS_STATE_LOCKED;
    return CUDA_SUCCESS;
}

static int do_unlock(int injected) {
    if (state != CU_PROCESS_STATE_LOCKED)
        return fail(CUDA_ERROR_ILLEGAL_STATE, "unlock: the process is %s, not locked", STATE_NAMES[state]);
    if (injected) return fail(CUDA_ERROR_UNKNOWN, "unlock: injected failure (FAKE_CUDA_FAIL)");
    state = CU_PROCESS_STATE_RUNNING;
    pthread_cond_broadcast(&cv);
    return CUDA_SUCCESS;
}

/* Take N.req if there is one: read it, close it, then delete it (never an open descriptor at rest). */
static int take_request(char *id, char *action, unsigned *timeout, int *injected, unsigned *delay, char *onto) {
    char buf[256];
    if (read_small(f_req, buf, sizeof buf) < 0) return 0;
    unlink(f_req);
    onto[0] = 0;
    if (sscanf(buf, "%63s %31s %u %d %u %63s", id, action, timeout, injected, delay, onto) < 5) {
        strcpy(action, "?");
        if (sscanf(buf, "%63s", id) != 1) strcpy(id, "?");
    }
    return 1;
}

static void *restore_thread(void *arg) {
    (void)arg;
    pthread_mutex_lock(&mu);
    restore_tid = gettid();
    publish_state();
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    for (unsigned long polls = 0;; polls++) {
        char id[64], action[32], ack[700], onto[64];
        unsigned timeout = 0, delay = 0;
        int injected = 0, code;
        if (!take_request(id, action, &timeout, &injected, &delay, onto)) {
            /* Rewrite the state file if it went missing (e.g. restored by CRIU elsewhere). */
            if (polls % 200 == 0 && access(f_state, F_OK) != 0) {
                pthread_mutex_lock(&mu);
                publish_state();
                pthread_mutex_unlock(&mu);
            }
            struct timespec t = {0, POLL_NS};
            nanosleep(&t, NULL);
            continue;
        }
        if (delay) sleep_ms(delay);
        pthread_mutex_lock(&mu);
        last_message[0] = 0;
        if (!strcmp(action, "lock")) code = do_lock(timeout, injected);
        else if (!strcmp(action, "checkpoint")) code = do_checkpoint(injected);
        else if (!strcmp(action, "restore")) code = do_restore(injected, onto);
        else if (!strcmp(action, "unlock")) code = do_unlock(injected);
        else if (!strcmp(action, "get-state")) code = CUDA_SUCCESS;
        else code = fail(CUDA_ERROR_INVALID_VALUE, "unknown request '%s'", action);
        publish_state();
        snprintf(ack, sizeof ack, "%s %d %s %s\n", id, code, STATE_NAMES[state], last_message);
        if (!atomic_load(&exiting)) write_atomic(f_ack, f_ack_tmp, ack);
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}

/* The UUID nvidia-smi gives GPU `index`: the index-th of FAKE_GPU_UUIDS (its last when shorter), else the
 * generated one. */
static void uuid_of_index(long index, char *out, size_t size) {
    const char *list = getenv("FAKE_GPU_UUIDS");
    if (list && *list) {
        char buf[1024], *tok, *save = NULL, *last = NULL;
        snprintf(buf, sizeof buf, "%s", list);
        for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            last = tok;
            if (index-- == 0) break;
        }
        snprintf(out, size, "%s", last ? last : "");
        return;
    }
    snprintf(out, size, "GPU-6661e5e0-0000-4000-8000-%012lx", index);
}

/* The GPU an app uses: FAKE_CUDA_GPU_UUID, else the first of CUDA_VISIBLE_DEVICES (else
 * NVIDIA_VISIBLE_DEVICES) by UUID or index, else GPU 0. */
static void app_gpu_uuid(char *out, size_t size) {
    const char *fixed = getenv("FAKE_CUDA_GPU_UUID");
    if (fixed && *fixed) {
        snprintf(out, size, "%s", fixed);
        return;
    }
    const char *vis = getenv("CUDA_VISIBLE_DEVICES");
    if (!vis || !*vis) vis = getenv("NVIDIA_VISIBLE_DEVICES");
    char first[64] = "";
    if (vis) sscanf(vis, "%63[^,]", first);
    if (!strncmp(first, "GPU-", 4)) snprintf(out, size, "%s", first);
    else if (first[0] >= '0' && first[0] <= '9') uuid_of_index(atol(first), out, size);
    else uuid_of_index(0, out, size);
}

/* cuInit in an app (FAKE_CUDA_DEVICE set): open the device, set up the control files, start the restore
 * thread. Called with mu held. */
static int init_app(const char *device) {
    int fd = open(device, O_RDWR | O_CLOEXEC);
    if (fd < 0) return fail(CUDA_ERROR_NO_DEVICE, "cannot open %s: %s", device, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISCHR(st.st_mode)) {
        close(fd);
        return fail(CUDA_ERROR_NO_DEVICE, "%s is not a character device", device);
    }
    const char *dir = getenv("FAKE_CUDA_DIR");
    if (!dir || !*dir) dir = DEFAULT_DIR;
    if (mkdir(dir, 01777) != 0 && errno != EEXIST) {
        int e = errno;
        close(fd);
        return fail(CUDA_ERROR_OPERATING_SYSTEM, "cannot create %s: %s", dir, strerror(e));
    }
    int me = getpid();
    snprintf(f_state, sizeof f_state, "%s/%d.state", dir, me);
    snprintf(f_state_tmp, sizeof f_state_tmp, "%s.tmp", f_state);
    snprintf(f_tid, sizeof f_tid, "%s/%d.tid", dir, me);
    snprintf(f_tid_tmp, sizeof f_tid_tmp, "%s.tmp", f_tid);
    snprintf(f_req, sizeof f_req, "%s/%d.req", dir, me);
    snprintf(f_ack, sizeof f_ack, "%s/%d.ack", dir, me);
    snprintf(f_ack_tmp, sizeof f_ack_tmp, "%s.tmp", f_ack);
    snprintf(f_lock, sizeof f_lock, "%s/%d.lock", dir, me);
    snprintf(f_gpu, sizeof f_gpu, "%s/%d.gpu", dir, me);
    snprintf(f_gpu_tmp, sizeof f_gpu_tmp, "%s.tmp", f_gpu);
    app_gpu_uuid(gpu_uuid, sizeof gpu_uuid);
    unlink(f_req); /* left by an earlier process with this PID */
    unlink(f_ack);
    snprintf(dev_path, sizeof dev_path, "%s", device);
    dev_fd = fd;
    busy_ms = env_long("FAKE_CUDA_BUSY_MS", 0);
    state = CU_PROCESS_STATE_RUNNING;
    atomic_store(&exiting, 0);
    restore_tid = 0;

    /* The restore thread takes no signals: they stay the app's. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_t t;
    int rc = pthread_create(&t, NULL, restore_thread, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        close(fd);
        dev_fd = -1;
        return fail(CUDA_ERROR_OPERATING_SYSTEM, "cannot start the restore thread: %s", strerror(rc));
    }
    pthread_detach(t);
    while (restore_tid == 0) pthread_cond_wait(&cv, &mu);

    static int registered;
    if (!registered) {
        registered = 1;
        atexit(cleanup_at_exit);
        pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
    }
    is_app = 1;
    return CUDA_SUCCESS;
}

/* cuInit: with FAKE_CUDA_DEVICE this process becomes a CUDA process; without it, the driver is initialised
 * for controller use only (the real cuCheckpointProcessRestore needs cuInit in the caller). */
EXPORT int cuInit(unsigned int flags) {
    if (flags != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuInit: flags must be 0");
    pthread_once(&cv_once, cv_init);
    pthread_mutex_lock(&mu);
    int rc = CUDA_SUCCESS;
    if (!initialized || owner != getpid()) {
        const char *device = getenv("FAKE_CUDA_DEVICE");
        if (device && *device) rc = init_app(device);
        if (rc == CUDA_SUCCESS) initialized = 1, owner = getpid();
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

/* App calls: wait until the process is RUNNING and no lock is pending, then count as in flight. */
static int app_enter(void) {
    if (!initialized || owner != getpid()) return CUDA_ERROR_NOT_INITIALIZED;
    if (!is_app) return CUDA_ERROR_INVALID_CONTEXT;
    pthread_mutex_lock(&mu);
    while (state != CU_PROCESS_STATE_RUNNING || lock_pending) pthread_cond_wait(&cv, &mu);
    inflight++;
    pthread_mutex_unlock(&mu);
    return CUDA_SUCCESS;
}

static void app_leave(void) {
    pthread_mutex_lock(&mu);
    if (--inflight == 0) pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

/* Whether [p, p+n) lies inside one allocation. */
static int in_device_memory(const void *p, size_t n) {
    int found = 0;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < nallocs && !found; i++) {
        const char *a = allocs[i].addr;
        found = (const char *)p >= a && n <= allocs[i].size && (size_t)((const char *)p - a) <= allocs[i].size - n;
    }
    pthread_mutex_unlock(&mu);
    return found;
}

EXPORT int fakeMemAlloc(void **dptr, size_t bytes) {
    if (!dptr || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    int rc = app_enter();
    if (rc) return rc;
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, dev_fd, 0);
    pthread_mutex_lock(&mu);
    if (p == MAP_FAILED || nallocs == MAX_ALLOCS) {
        if (p != MAP_FAILED) munmap(p, bytes);
        rc = CUDA_ERROR_OUT_OF_MEMORY;
    } else {
        allocs[nallocs++] = (struct alloc){p, bytes, NULL};
        *dptr = p;
    }
    pthread_mutex_unlock(&mu);
    app_leave();
    return rc;
}

EXPORT int fakeMemFree(void *dptr) {
    int rc = app_enter();
    if (rc) return rc;
    rc = CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < nallocs; i++) {
        if (allocs[i].addr == dptr) {
            munmap(dptr, allocs[i].size);
            allocs[i] = allocs[--nallocs];
            rc = CUDA_SUCCESS;
            break;
        }
    }
    pthread_mutex_unlock(&mu);
    app_leave();
    return rc;
}

EXPORT int fakeMemcpyHtoD(void *dst, const void *src, size_t n) {
    int rc = app_enter();
    if (rc) return rc;
    if (in_device_memory(dst, n)) memcpy(dst, src, n);
    else rc = CUDA_ERROR_INVALID_VALUE;
    app_leave();
    return rc;
}

EXPORT int fakeMemcpyDtoH(void *dst, const void *src, size_t n) {
    int rc = app_enter();
    if (rc) return rc;
    if (in_device_memory(src, n)) memcpy(dst, src, n);
    else rc = CUDA_ERROR_INVALID_VALUE;
    app_leave();
    return rc;
}

EXPORT int fakeLaunchIncrement(void *dptr, size_t bytes) {
    if (bytes < 8 || bytes % 8) return CUDA_ERROR_INVALID_VALUE;
    int rc = app_enter();
    if (rc) return rc;
    if (in_device_memory(dptr, bytes)) {
        uint64_t *w = dptr, n = ++w[0];
        for (size_t i = 1; i < bytes / 8; i++) w[i] = (n << 32) ^ (i * 0x9E3779B97F4A7C15ULL);
        if (busy_ms > 0) sleep_ms(busy_ms);
    } else {
        rc = CUDA_ERROR_INVALID_VALUE;
    }
    app_leave();
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* Controller side.                                                                                 */
/* ------------------------------------------------------------------------------------------------ */

struct target {
    int pid;                /* host PID (thread group) */
    int nspid;              /* its PID in its own namespace */
    char dir[1100];         /* its control directory, through /proc/<pid>/root */
    char base[1150];        /* dir/<nspid> */
};

/* The value of `key` ("Tgid:") in /proc/<pid>/status: the last number on its line; -1 if none. */
static int status_field(int pid, const char *key, char *state_out) {
    char path[64], line[512];
    int value = -1;
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "re");
    if (!f) return -1;
    while (fgets(line, sizeof line, f)) {
        if (state_out && !strncmp(line, "State:", 6)) sscanf(line + 6, " %c", state_out);
        if (!strncmp(line, key, strlen(key))) {
            char *tok, *save = NULL;
            for (tok = strtok_r(line + strlen(key), " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save))
                value = atoi(tok);
        }
    }
    fclose(f);
    return value;
}

/* Whether /proc/<pid>/maps maps a file named libcuda.so*. */
static int maps_libcuda(int pid) {
    char path[64], *line = NULL;
    size_t cap = 0;
    int found = 0;
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *f = fopen(path, "re");
    if (!f) return 0;
    while (!found && getline(&line, &cap, f) > 0) found = strstr(line, "/libcuda.so") != NULL;
    free(line);
    fclose(f);
    return found;
}

/* FAKE_CUDA_DIR from /proc/<pid>/environ, or the default. */
static void target_dir_env(int pid, char *out, size_t size) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/environ", pid);
    snprintf(out, size, "%s", DEFAULT_DIR);
    FILE *f = fopen(path, "re");
    if (!f) return;
    char *entry = NULL;
    size_t cap = 0;
    while (getdelim(&entry, &cap, 0, f) > 0) {
        if (!strncmp(entry, "FAKE_CUDA_DIR=", 14) && entry[14]) {
            snprintf(out, size, "%s", entry + 14);
            break;
        }
    }
    free(entry);
    fclose(f);
}

/* Find the CUDA process behind `pid` (a process or one of its threads). */
static int find_target(int pid, struct target *t) {
    char zstate = 0, dir[1024], path[sizeof t->base + 16];
    struct stat st;
    if (pid <= 0) return fail(CUDA_ERROR_INVALID_VALUE, "invalid pid %d", pid);
    int tgid = status_field(pid, "Tgid:", &zstate);
    if (tgid <= 0 || zstate == 'Z' || zstate == 'X') return fail(CUDA_ERROR_NOT_FOUND, "no process %d", pid);
    t->pid = tgid;
    t->nspid = status_field(tgid, "NSpid:", NULL);
    if (t->nspid <= 0) return fail(CUDA_ERROR_NOT_FOUND, "no process %d", pid);
    if (!maps_libcuda(tgid)) return fail(CUDA_ERROR_NOT_FOUND, "process %d has not loaded libcuda", pid);
    target_dir_env(tgid, dir, sizeof dir);
    snprintf(t->dir, sizeof t->dir, "/proc/%d/root%s%s", tgid, dir[0] == '/' ? "" : "/", dir);
    snprintf(t->base, sizeof t->base, "%s/%d", t->dir, t->nspid);
    snprintf(path, sizeof path, "%s.state", t->base);
    if (stat(path, &st) != 0) return fail(CUDA_ERROR_NOT_FOUND, "process %d is not a CUDA process", pid);
    return CUDA_SUCCESS;
}

/* Whether FAKE_CUDA_FAIL / FAKE_CUDA_DELAY_MS in the caller's environment name `action` for `pid`.
 * Entries are comma-separated: FAIL "action" or "action:pid"; DELAY "action:ms" or "action:ms:pid".
 * Returns 1 (and the delay in *ms) when one matches. */
static int injection(const char *var, const char *action, int pid, long *ms) {
    const char *v = getenv(var);
    if (!v || !*v) return 0;
    char buf[512], *entry, *save = NULL;
    snprintf(buf, sizeof buf, "%s", v);
    for (entry = strtok_r(buf, ",", &save); entry; entry = strtok_r(NULL, ",", &save)) {
        char *fields[3] = {0}, *s2 = NULL;
        int n = 0;
        for (char *f = strtok_r(entry, ":", &s2); f && n < 3; f = strtok_r(NULL, ":", &s2)) fields[n++] = f;
        if (!fields[0] || strcmp(fields[0], action)) continue;
        const char *want_pid = ms ? fields[2] : fields[1];
        if (want_pid && atoi(want_pid) != pid) continue;
        if (ms) *ms = fields[1] ? atol(fields[1]) : 0;
        return 1;
    }
    return 0;
}

static int process_gone(int pid) {
    char zstate = 0;
    return status_field(pid, "Tgid:", &zstate) <= 0 || zstate == 'Z' || zstate == 'X';
}

/* Send `action` to the restore thread of `pid` and wait for its answer; *state_out gets the state after. */
static int request(int pid, const char *action, unsigned timeout_ms, CUprocessState *state_out, const char *onto) {
    struct target t;
    int rc = find_target(pid, &t);
    if (rc) return rc;
    long delay = 0;
    int injected = injection("FAKE_CUDA_FAIL", action, pid, NULL);
    injection("FAKE_CUDA_DELAY_MS", action, pid, &delay);
    long deadline = now_ms() + env_long("FAKE_CUDA_CONTROL_TIMEOUT_MS", 30000) + timeout_ms + (delay > 0 ? delay : 0);

    char f_lockp[sizeof t.base + 16], f_reqp[sizeof t.base + 16], f_tmp[sizeof t.base + 32], f_ackp[sizeof t.base + 16];
    snprintf(f_lockp, sizeof f_lockp, "%s.lock", t.base);
    snprintf(f_reqp, sizeof f_reqp, "%s.req", t.base);
    snprintf(f_ackp, sizeof f_ackp, "%s.ack", t.base);
    snprintf(f_tmp, sizeof f_tmp, "%s.req.%d.tmp", t.base, (int)getpid());

    /* One request at a time per target. */
    int lock_fd = open(f_lockp, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (lock_fd < 0) return fail(CUDA_ERROR_UNKNOWN, "cannot open %s: %s", f_lockp, strerror(errno));
    while (flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
        if (now_ms() > deadline) {
            close(lock_fd);
            return fail(CUDA_ERROR_TIMEOUT, "%s: another request to process %d did not finish", action, pid);
        }
        sleep_ms(1);
    }

    char id[64], text[256], ack[1024];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(id, sizeof id, "%d-%ld%09ld", (int)getpid(), (long)ts.tv_sec, ts.tv_nsec);
    snprintf(text, sizeof text, "%s %s %u %d %ld %s\n", id, action, timeout_ms, injected, delay > 0 ? delay : 0,
             onto && *onto ? onto : "-");
    if (write_atomic(f_reqp, f_tmp, text) != 0) {
        rc = fail(CUDA_ERROR_UNKNOWN, "cannot write %s: %s", f_reqp, strerror(errno));
        goto out;
    }
    for (;;) {
        if (read_small(f_ackp, ack, sizeof ack) > 0 && !strncmp(ack, id, strlen(id)) && ack[strlen(id)] == ' ') {
            unlink(f_ackp);
            char word[32] = "";
            int consumed = 0;
            if (sscanf(ack + strlen(id), " %d %31s %n", &rc, word, &consumed) < 2) {
                rc = fail(CUDA_ERROR_UNKNOWN, "bad answer from process %d", pid);
                goto out;
            }
            char *msg = ack + strlen(id) + consumed;
            msg[strcspn(msg, "\n")] = 0;
            snprintf(last_message, sizeof last_message, "%s", msg);
            for (int s = 0; s < 4; s++)
                if (!strcmp(word, STATE_NAMES[s]) && state_out) *state_out = (CUprocessState)s;
            goto out;
        }
        if (process_gone(t.pid)) {
            rc = fail(CUDA_ERROR_NOT_FOUND, "process %d exited", pid);
            unlink(f_reqp);
            goto out;
        }
        if (now_ms() > deadline) {
            /* Withdraw the request if the restore thread has not taken it (a stopped or frozen process). */
            int withdrawn = read_small(f_reqp, ack, sizeof ack) > 0 && !strncmp(ack, id, strlen(id)) && unlink(f_reqp) == 0;
            rc = fail(CUDA_ERROR_TIMEOUT, "%s: process %d did not answer (%s)", action, pid,
                      withdrawn ? "stopped or frozen? request withdrawn" : "request still in progress");
            goto out;
        }
        sleep_ms(1);
    }
out:
    flock(lock_fd, LOCK_UN);
    close(lock_fd);
    return rc;
}

EXPORT int cuCheckpointProcessGetState(int pid, CUprocessState *state_out) {
    if (!state_out) return fail(CUDA_ERROR_INVALID_VALUE, "state is NULL");
    if (injection("FAKE_CUDA_FAIL", "get-state", pid, NULL)) {
        struct target t;
        int rc = find_target(pid, &t);
        return rc ? rc : fail(CUDA_ERROR_UNKNOWN, "get-state: injected failure (FAKE_CUDA_FAIL)");
    }
    CUprocessState s = CU_PROCESS_STATE_FAILED;
    int rc = request(pid, "get-state", 0, &s, NULL);
    if (rc == CUDA_SUCCESS) *state_out = s;
    return rc;
}

/* The restore thread's TID, as a host TID. Read from N.tid: answered even while the process is frozen. */
EXPORT int cuCheckpointProcessGetRestoreThreadId(int pid, int *tid) {
    if (!tid) return fail(CUDA_ERROR_INVALID_VALUE, "tid is NULL");
    struct target t;
    int rc = find_target(pid, &t);
    if (rc) return rc;
    if (injection("FAKE_CUDA_FAIL", "get-restore-tid", pid, NULL))
        return fail(CUDA_ERROR_UNKNOWN, "get-restore-tid: injected failure (FAKE_CUDA_FAIL)");
    char path[sizeof t.base + 16], buf[32];
    snprintf(path, sizeof path, "%s.tid", t.base);
    int nstid = read_small(path, buf, sizeof buf) > 0 ? atoi(buf) : 0;
    if (nstid <= 0) return fail(CUDA_ERROR_NOT_FOUND, "process %d has no restore thread", pid);
    /* Translate the TID of the target's namespace into ours through the NSpid lines of its tasks. */
    snprintf(path, sizeof path, "/proc/%d/task", t.pid);
    DIR *d = opendir(path);
    if (!d) return fail(CUDA_ERROR_NOT_FOUND, "no process %d", pid);
    struct dirent *e;
    int host = 0;
    while (!host && (e = readdir(d))) {
        int task = atoi(e->d_name);
        char p2[96], line[256];
        if (task <= 0) continue;
        snprintf(p2, sizeof p2, "/proc/%d/task/%d/status", t.pid, task);
        FILE *f = fopen(p2, "re");
        if (!f) continue;
        while (fgets(line, sizeof line, f)) {
            if (strncmp(line, "NSpid:", 6)) continue;
            char *last = strrchr(line, '\t');
            if (last && atoi(last + 1) == nstid) host = task;
        }
        fclose(f);
    }
    closedir(d);
    if (!host) return fail(CUDA_ERROR_NOT_FOUND, "process %d: restore thread %d is gone", pid, nstid);
    *tid = host;
    return CUDA_SUCCESS;
}

/* The args structs' reserved fields must be zero (the ABI keeps them for later use). */
static int reserved_nonzero(const unsigned long long *r, int n) {
    for (int i = 0; i < n; i++)
        if (r[i]) return 1;
    return 0;
}

#define CHECK_RESERVED(args, field, n)                                                                         \
    if ((args) && reserved_nonzero((args)->field, n))                                                           \
        return fail(CUDA_ERROR_INVALID_VALUE, "reserved fields of the args must be zero");

EXPORT int cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args) {
    if (args && args->reserved0) return fail(CUDA_ERROR_INVALID_VALUE, "reserved fields of the args must be zero");
    CHECK_RESERVED(args, reserved1, 7)
    return request(pid, "lock", args ? args->timeoutMs : 0, NULL, NULL);
}

EXPORT int cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args) {
    CHECK_RESERVED(args, reserved, 8)
    return request(pid, "checkpoint", 0, NULL, NULL);
}

static void uuid_text(const CUuuid *u, char *out, size_t size) {
    const unsigned char *b = (const unsigned char *)u->bytes;
    snprintf(out, size, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2], b[3],
             b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

/* Whether this host (the caller's FAKE_GPU_COUNT GPUs, named as nvidia-smi names them) has GPU `uuid`. */
static int host_has_gpu(const char *uuid) {
    long count = env_long("FAKE_GPU_COUNT", 1);
    char mine[64];
    for (long i = 0; i < count; i++) {
        uuid_of_index(i, mine, sizeof mine);
        if (!strcasecmp(mine, uuid)) return 1;
    }
    return 0;
}

/* Restore onto the GPU the process was checkpointed on, or onto the one its GPU pair names. The pairs must
 * name every checkpointed GPU, and each new GPU must be on this host (the real driver also wants enough
 * memory and the same chip, which the fake does not model). A refused remapping leaves the state as it was. */
EXPORT int cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args) {
    if (args) {
        /* CUDA 12.8's restore args are all reserved; 12.9+ has gpuPairs and gpuPairsCount first. */
        size_t from = env_long("FAKE_CUDA_DRIVER_VERSION", 12080) >= 12090 ? offsetof(CUcheckpointRestoreArgs, reserved) : 0;
        const char *raw = (const char *)args;
        for (size_t i = from; i < sizeof *args; i++)
            if (raw[i]) return fail(CUDA_ERROR_INVALID_VALUE, "reserved fields of the args must be zero");
        if (args->gpuPairsCount && !args->gpuPairs) return fail(CUDA_ERROR_INVALID_VALUE, "gpuPairs is NULL");
    }
    /* The real driver needs cuInit in the restoring process (unless persistence mode is on). */
    if (!initialized || owner != getpid())
        return fail(CUDA_ERROR_NOT_INITIALIZED, "restore: cuInit was not called in this process");
    struct target t;
    int rc = find_target(pid, &t);
    if (rc) return rc;
    char path[sizeof t.base + 16], was[80] = "", onto[64] = "";
    snprintf(path, sizeof path, "%s.gpu", t.base);
    if (read_small(path, was, sizeof was) > 0) was[strcspn(was, "\n")] = 0;
    unsigned count = args ? args->gpuPairsCount : 0;
    if (count > 0) {
        for (unsigned i = 0; i < count && !onto[0]; i++) {
            char old[64];
            uuid_text(&args->gpuPairs[i].oldUuid, old, sizeof old);
            if (!strcasecmp(old, was)) uuid_text(&args->gpuPairs[i].newUuid, onto, sizeof onto);
        }
        if (!onto[0])
            return fail(CUDA_ERROR_INVALID_VALUE,
                        "restore: the GPU pairs do not name %s, on which process %d was checkpointed (they must name every checkpointed GPU)",
                        was, pid);
        if (!host_has_gpu(onto)) return fail(CUDA_ERROR_INVALID_DEVICE, "restore: this host has no GPU %s", onto);
    } else if (was[0] && !host_has_gpu(was)) {
        return fail(CUDA_ERROR_INVALID_DEVICE,
                    "restore: process %d was checkpointed on GPU %s, which this host does not have (remap it with gpuPairs)",
                    pid, was);
    }
    return request(pid, "restore", 0, NULL, onto);
}

EXPORT int cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args) {
    CHECK_RESERVED(args, reserved, 8)
    return request(pid, "unlock", 0, NULL, NULL);
}
