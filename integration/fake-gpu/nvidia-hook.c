/* Fake of the legacy nvidia-container-runtime-hook (an OCI prestart hook that runs
 * `nvidia-container-cli configure`): it reads the container's state from stdin, enters the mount namespace of
 * the container's init, and bind-mounts the driver library, the tools and the device node from the host into
 * the container's rootfs, each read-only as the real one does. These mounts are not in the OCI spec.
 *
 * Usage (as the spec's hook): nvidia-hook prestart. Environment (the hook's own, from the spec):
 *   FAKE_NVIDIA_DEVICE   the host's device node to mount at /dev/nvidia0 (required)
 *   FAKE_NVIDIA_HOOK_LOG a file to which each run appends "pid <PID> mounts <N>" (optional)
 * The library and tools come from this program's own folder: bin/../lib/libcuda.so.1 and
 * bin/{gpu-app,cuda-checkpoint,nvidia-smi}. Like the real hook, it does nothing for a container whose
 * process env has no NVIDIA_VISIBLE_DEVICES (or has void/none). Exit 1 with a message on any failure. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

static void die(const char *fmt, const char *a, const char *b) {
    fprintf(stderr, "nvidia-hook: ");
    fprintf(stderr, fmt, a, b);
    fprintf(stderr, "\n");
    exit(1);
}

static char *slurp(FILE *f) {
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    size_t n;
    while (buf && (n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (cap - len < 2) buf = realloc(buf, cap *= 2);
    }
    if (!buf) die("out of memory%s%s", "", "");
    buf[len] = 0;
    return buf;
}

/* The string value after `"key"` (the first occurrence at or after `from`), copied into out. */
static int json_string(const char *from, const char *key, char *out, size_t size) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\"", key);
    const char *p = strstr(from, pat);
    if (!p) return -1;
    p = strchr(p + strlen(pat), ':');
    if (!p) return -1;
    p = strchr(p, '"');
    if (!p) return -1;
    const char *end = strchr(p + 1, '"');
    if (!end || (size_t)(end - p) > size) return -1;
    snprintf(out, size, "%.*s", (int)(end - p - 1), p + 1);
    return 0;
}

/* Create `dst` (a file, or a folder with its parents) like the source's kind, bind-mount `src` onto it and
 * remount it read-only with `flags`. */
static void bind(const char *src, const char *dst, unsigned long flags) {
    char dir[2 * PATH_MAX];
    snprintf(dir, sizeof dir, "%s", dst);
    for (char *s = dir + 1; (s = strchr(s, '/')); s++) {
        *s = 0;
        mkdir(dir, 0755);
        *s = '/';
    }
    int fd = open(dst, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0 && errno != EISDIR) die("cannot create %s: %s", dst, strerror(errno));
    if (fd >= 0) close(fd);
    if (mount(src, dst, NULL, MS_BIND, NULL) != 0) die("cannot bind-mount %s: %s", src, strerror(errno));
    if (mount(NULL, dst, NULL, MS_BIND | MS_REMOUNT | flags, NULL) != 0) die("cannot remount %s: %s", dst, strerror(errno));
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "prestart")) die("usage: nvidia-hook prestart%s%s", "", "");
    char *state = slurp(stdin);
    const char *pidp = strstr(state, "\"pid\"");
    int pid = pidp ? atoi(strchr(pidp, ':') + 1) : 0;
    char bundle[PATH_MAX], root[PATH_MAX], rootfs[PATH_MAX], config[PATH_MAX + 16];
    if (pid <= 0 || json_string(state, "bundle", bundle, sizeof bundle)) die("no pid or bundle in the state: %s%s", state, "");
    snprintf(config, sizeof config, "%s/config.json", bundle);
    FILE *cf = fopen(config, "re");
    if (!cf) die("cannot read %s: %s", config, strerror(errno));
    char *spec = slurp(cf);
    fclose(cf);
    const char *vis = strstr(spec, "\"NVIDIA_VISIBLE_DEVICES=");
    if (!vis || !strncmp(vis + 24, "void\"", 5) || !strncmp(vis + 24, "none\"", 5) || vis[24] == '"') return 0;
    const char *rootobj = strstr(spec, "\"root\"");
    if (!rootobj || json_string(rootobj, "path", root, sizeof root)) die("no root.path in %s%s", config, "");
    if (root[0] == '/') snprintf(rootfs, sizeof rootfs, "%s", root);
    else snprintf(rootfs, sizeof rootfs, "%.2000s/%.2000s", bundle, root);

    const char *device = getenv("FAKE_NVIDIA_DEVICE");
    if (!device || !*device) die("FAKE_NVIDIA_DEVICE is not set%s%s", "", "");
    char exe[PATH_MAX], bin[PATH_MAX], lib[PATH_MAX + 8];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) die("cannot read /proc/self/exe%s%s", "", "");
    exe[n] = 0;
    snprintf(bin, sizeof bin, "%s", exe);
    *strrchr(bin, '/') = 0;
    snprintf(lib, sizeof lib, "%s/../lib", bin);

    char ns[64];
    snprintf(ns, sizeof ns, "/proc/%d/ns/mnt", pid);
    int nsfd = open(ns, O_RDONLY | O_CLOEXEC);
    if (nsfd < 0 || setns(nsfd, CLONE_NEWNS) != 0) die("cannot enter %s: %s", ns, strerror(errno));

    struct {
        char src[PATH_MAX + 32];
        const char *dst;
        unsigned long flags;
    } mounts[] = {
        {"", "/nvidia/lib/libcuda.so.1", MS_RDONLY | MS_NODEV | MS_NOSUID},
        {"", "/opt/gpu/gpu-app", MS_RDONLY | MS_NODEV | MS_NOSUID},
        {"", "/opt/gpu/cuda-checkpoint", MS_RDONLY | MS_NODEV | MS_NOSUID},
        {"", "/opt/gpu/nvidia-smi", MS_RDONLY | MS_NODEV | MS_NOSUID},
        {"", "/dev/nvidia0", MS_RDONLY | MS_NOSUID | MS_NOEXEC},
    };
    snprintf(mounts[0].src, sizeof mounts[0].src, "%s/libcuda.so.1", lib);
    snprintf(mounts[1].src, sizeof mounts[1].src, "%s/gpu-app", bin);
    snprintf(mounts[2].src, sizeof mounts[2].src, "%s/cuda-checkpoint", bin);
    snprintf(mounts[3].src, sizeof mounts[3].src, "%s/nvidia-smi", bin);
    snprintf(mounts[4].src, sizeof mounts[4].src, "%s", device);
    int count = sizeof mounts / sizeof mounts[0];
    for (int i = 0; i < count; i++) {
        char dst[2 * PATH_MAX];
        snprintf(dst, sizeof dst, "%s%s", rootfs, mounts[i].dst);
        bind(mounts[i].src, dst, mounts[i].flags);
    }
    const char *log = getenv("FAKE_NVIDIA_HOOK_LOG");
    if (log && *log) {
        FILE *lf = fopen(log, "ae");
        if (lf) fprintf(lf, "pid %d mounts %d\n", pid, count), fclose(lf);
    }
    return 0;
}
