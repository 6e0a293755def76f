/* slowfs: an LD_PRELOAD shim that makes metadata and read calls on one tree slow, the way a
 * network filesystem's round trips are, so that latency-bound storage can be measured on a
 * local disk. Every call below that names a path containing $SLOWFS_MATCH (or a path relative
 * to a directory fd: a walk's own calls) sleeps $SLOWFS_DELAY_US microseconds before the real
 * call; reads of a file descriptor opened that way sleep too. With $SLOWFS_COUNTER naming an
 * existing file of at least 8 bytes, every delayed call of every process (forked workers
 * included) adds one to the 64-bit counter at its start.
 *
 *   gcc -O2 -shared -fPIC -o slowfs.so slowfs.c -ldl
 *   SLOWFS_MATCH=/data/tree SLOWFS_DELAY_US=200 LD_PRELOAD=$PWD/slowfs.so du -s /data/tree
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_FD 65536
static long delay_ns;
static const char *match;
static atomic_int ready;
static atomic_long local_count;
static _Atomic long *delayed = &local_count;
static atomic_uchar slow_fd[MAX_FD];

static void setup(void) {
    if (atomic_load(&ready)) return;
    const char *d = getenv("SLOWFS_DELAY_US");
    delay_ns = d ? atol(d) * 1000L : 0;
    match = getenv("SLOWFS_MATCH");
    if (match && !*match) match = NULL;
    const char *counter = getenv("SLOWFS_COUNTER");
    if (counter) {
        int fd = (int)syscall(SYS_openat, AT_FDCWD, counter, O_RDWR | O_CLOEXEC);
        if (fd >= 0) {
            void *m = mmap(NULL, sizeof(long), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (m != MAP_FAILED) delayed = (_Atomic long *)m;
            syscall(SYS_close, fd);
        }
    }
    atomic_store(&ready, 1);
}

static void pause_call(void) {
    atomic_fetch_add(delayed, 1);
    if (delay_ns > 0) {
        struct timespec ts = {delay_ns / 1000000000L, delay_ns % 1000000000L};
        while (nanosleep(&ts, &ts) != 0) {}
    }
}

static int slow_path(int dirfd, const char *path) {
    setup();
    if (!match || !path) return 0;
    if (path[0] != '/' && dirfd != AT_FDCWD) return 1;
    return strstr(path, match) != NULL;
}

static void mark(int fd, int slow) {
    if (fd >= 0 && fd < MAX_FD) atomic_store(&slow_fd[fd], (unsigned char)slow);
}

#define REAL(name, ret, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

#define OPEN_LIKE(name)                                                        \
    int name(const char *path, int flags, ...) {                               \
        mode_t mode = 0;                                                       \
        if (flags & (O_CREAT | O_TMPFILE)) {                                   \
            va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); \
        }                                                                      \
        REAL(name, int, const char *, int, ...);                               \
        int slow = slow_path(AT_FDCWD, path);                                  \
        if (slow) pause_call();                                                \
        int fd = real_##name(path, flags, mode);                               \
        mark(fd, slow);                                                        \
        return fd;                                                             \
    }
OPEN_LIKE(open)
OPEN_LIKE(open64)

#define OPENAT_LIKE(name)                                                      \
    int name(int dirfd, const char *path, int flags, ...) {                    \
        mode_t mode = 0;                                                       \
        if (flags & (O_CREAT | O_TMPFILE)) {                                   \
            va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); \
        }                                                                      \
        REAL(name, int, int, const char *, int, ...);                          \
        int slow = slow_path(dirfd, path);                                     \
        if (slow) pause_call();                                                \
        int fd = real_##name(dirfd, path, flags, mode);                        \
        mark(fd, slow);                                                        \
        return fd;                                                             \
    }
OPENAT_LIKE(openat)
OPENAT_LIKE(openat64)

DIR *opendir(const char *path) {
    REAL(opendir, DIR *, const char *);
    int slow = slow_path(AT_FDCWD, path);
    if (slow) pause_call();
    DIR *d = real_opendir(path);
    if (d) mark(dirfd(d), slow);
    return d;
}

#define STAT_LIKE(name, st_t)                                                  \
    int name(const char *path, st_t *buf) {                                    \
        REAL(name, int, const char *, st_t *);                                 \
        if (slow_path(AT_FDCWD, path)) pause_call();                           \
        return real_##name(path, buf);                                         \
    }
STAT_LIKE(stat, struct stat)
STAT_LIKE(lstat, struct stat)
STAT_LIKE(stat64, struct stat64)
STAT_LIKE(lstat64, struct stat64)

#define FSTATAT_LIKE(name, st_t)                                               \
    int name(int dirfd, const char *path, st_t *buf, int flags) {              \
        REAL(name, int, int, const char *, st_t *, int);                       \
        if (slow_path(dirfd, path)) pause_call();                              \
        return real_##name(dirfd, path, buf, flags);                           \
    }
FSTATAT_LIKE(fstatat, struct stat)
FSTATAT_LIKE(fstatat64, struct stat64)

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *buf) {
    REAL(statx, int, int, const char *, int, unsigned int, struct statx *);
    if (slow_path(dirfd, path)) pause_call();
    return real_statx(dirfd, path, flags, mask, buf);
}

#define READ_LIKE(name, off_t_)                                                \
    ssize_t name(int fd, void *buf, size_t n, off_t_ off) {                    \
        REAL(name, ssize_t, int, void *, size_t, off_t_);                      \
        if (fd >= 0 && fd < MAX_FD && atomic_load(&slow_fd[fd])) pause_call(); \
        return real_##name(fd, buf, n, off);                                   \
    }
READ_LIKE(pread, off_t)
READ_LIKE(pread64, off64_t)

ssize_t read(int fd, void *buf, size_t n) {
    REAL(read, ssize_t, int, void *, size_t);
    if (fd >= 0 && fd < MAX_FD && atomic_load(&slow_fd[fd])) pause_call();
    return real_read(fd, buf, n);
}

int close(int fd) {
    REAL(close, int, int);
    mark(fd, 0);
    return real_close(fd);
}
