/* migholder: the guest side of the live-migration end-to-end test and benchmark.
 *
 * It holds on a virtio-fs mount everything a migrated daemon must carry over (open files of
 * each kind, a directory stream part way, a shared mapping, a cwd, a flock and an fcntl lock,
 * many cached dentries, O_DIRECT writes in flight) and is driven step by step by the host
 * through a file on the share, so that nothing needs 9p (QEMU refuses to migrate with a 9p
 * export) or a console that would have to follow the guest from QEMU to QEMU.
 *
 *   migholder MNT NFILES [unlinked]
 *
 * The host prepares the share (tests/support/live_migration/holder.py). Protocol:
 *  - MNT/ctl/cmd holds "SEQ WORD\n" padded to 64 bytes; the host rewrites it in place.
 *    The guest re-reads it every 20 ms (dropping its page cache first, so each poll is a
 *    READ through its open fd) and runs WORD ("check" or "finish") once per new SEQ.
 *  - After setup and after each command it writes MNT/ctl/rep-SEQ (setup: SEQ 0) by
 *    rename, as "key=value" lines; "done=1" is the last line.
 * A "check" re-reads and writes through every held fd, compares every inode number with the
 * one seen at setup, continues the directory listing by one getdents64 call, and reports.
 * "finish" stops the O_DIRECT writer, reads the listing to its end, lets go of the locks
 * and closes everything.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAP_LEN 8192
#define BLOCK 4096
#define LIST_BUF 600 /* small, so the listing takes several getdents64 calls */
#define MAX_REPORT (1 << 20)

enum { H_RW, H_RO, H_APP, H_MAP, H_DIR, H_FLK, H_PLK, H_CWD, H_GONE, H_COUNT };
static const char *held_names[H_COUNT] = {"rw", "ro", "app", "map", "list", "flk", "plk",
                                          "sub", "gone"};
static int held_fd[H_COUNT];
static ino_t held_ino[H_COUNT];

static const char *mnt;
static int nfiles, with_unlinked, cmd_fd;
static char *map;
static ino_t *many_ino;
static int list_eof;
static char *listed; /* comma-separated names so far, in order */
static size_t listed_len;

struct writer_state {
    volatile int stop;
    volatile long count;
    volatile long errors;
    volatile int last_errno;
};
static struct writer_state *writer;
static pid_t writer_pid;

static char report[MAX_REPORT];
static size_t report_len;

static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(report + report_len, sizeof(report) - report_len, fmt, ap);
    va_end(ap);
    if (n > 0)
        report_len += (size_t)n < sizeof(report) - report_len ? (size_t)n
                                                               : sizeof(report) - report_len - 1;
}

static void die(const char *what)
{
    fprintf(stderr, "migholder: %s: %s\n", what, strerror(errno));
    exit(2);
}

static char *path(const char *rel)
{
    static char buf[4096];
    snprintf(buf, sizeof(buf), "%s/%s", mnt, rel);
    return buf;
}

static void publish(int seq)
{
    char tmp[4096], final[4096];
    say("done=1\n");
    snprintf(tmp, sizeof(tmp), "%s/ctl/.rep-%d", mnt, seq);
    snprintf(final, sizeof(final), "%s/ctl/rep-%d", mnt, seq);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        die("report");
    if (write(fd, report, report_len) != (ssize_t)report_len || fsync(fd) || close(fd))
        die("report write");
    if (rename(tmp, final))
        die("report rename");
    printf("migholder: report %d\n", seq);
    fflush(stdout);
    report_len = 0;
}

static void writer_loop(void)
{
    int fd = open(path("direct"), O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT, 0644);
    if (fd < 0) {
        writer->last_errno = errno;
        writer->errors++;
        _exit(1);
    }
    char *buf;
    if (posix_memalign((void **)&buf, BLOCK, BLOCK))
        _exit(1);
    struct timespec pause = {0, 10 * 1000 * 1000};
    for (long i = 0; !writer->stop; i++) {
        memset(buf, 'a' + (int)(i % 26), BLOCK);
        snprintf(buf, 32, "block %08ld\n", i);
        ssize_t n = pwrite(fd, buf, BLOCK, (off_t)i * BLOCK);
        if (n != BLOCK) {
            writer->last_errno = n < 0 ? errno : EIO;
            writer->errors++;
            break;
        }
        writer->count = i + 1;
        nanosleep(&pause, NULL);
    }
    close(fd);
    _exit(0);
}

static void list_more(int to_end)
{
    char buf[LIST_BUF];
    do {
        long n = syscall(SYS_getdents64, held_fd[H_DIR], buf, sizeof(buf));
        if (n < 0) {
            say("list_error=%s\n", strerror(errno));
            return;
        }
        if (n == 0) {
            list_eof = 1;
            return;
        }
        for (long off = 0; off < n;) {
            struct dirent64 *d = (struct dirent64 *)(buf + off);
            size_t len = strlen(d->d_name);
            listed = realloc(listed, listed_len + len + 2);
            if (listed_len)
                listed[listed_len++] = ',';
            memcpy(listed + listed_len, d->d_name, len + 1);
            listed_len += len;
            off += d->d_reclen;
        }
    } while (to_end);
}

static int whole_file_lock(int fd, short type)
{
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    return fcntl(fd, F_SETLK, &fl);
}

static void setup(void)
{
    /* the writer first, so it inherits neither the locks nor the held files */
    writer = mmap(NULL, sizeof(*writer), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                  -1, 0);
    if (writer == MAP_FAILED)
        die("mmap writer state");
    writer_pid = fork();
    if (writer_pid < 0)
        die("fork");
    if (writer_pid == 0)
        writer_loop();

    static const int flags[H_COUNT] = {O_RDWR, O_RDONLY, O_WRONLY | O_APPEND, O_RDWR,
                                       O_RDONLY | O_DIRECTORY, O_RDONLY, O_RDWR,
                                       O_RDONLY | O_DIRECTORY, O_RDWR};
    for (int h = 0; h < H_COUNT; h++) {
        held_fd[h] = -1;
        if (h == H_GONE && !with_unlinked)
            continue;
        held_fd[h] = open(path(held_names[h]), flags[h]);
        if (held_fd[h] < 0)
            die(held_names[h]);
        struct stat st;
        if (fstat(held_fd[h], &st))
            die("fstat");
        held_ino[h] = st.st_ino;
        say("ino_%s=%lu\n", held_names[h], (unsigned long)st.st_ino);
    }
    if (with_unlinked) {
        char buf[64] = {0};
        if (pread(held_fd[H_GONE], buf, sizeof(buf) - 1, 0) < 0)
            die("read gone");
        if (unlink(path("gone")))
            die("unlink gone");
        say("gone_before=%s\n", strtok(buf, "\n"));
    }
    map = mmap(NULL, MAP_LEN, PROT_READ | PROT_WRITE, MAP_SHARED, held_fd[H_MAP], 0);
    if (map == MAP_FAILED)
        die("mmap");
    if (fchdir(held_fd[H_CWD]))
        die("chdir");
    if (flock(held_fd[H_FLK], LOCK_EX | LOCK_NB))
        die("flock");
    if (whole_file_lock(held_fd[H_PLK], F_WRLCK))
        die("fcntl lock");
    while (!list_eof && listed_len < 300) /* about the first 50 of its 200 names */
        list_more(0);
    many_ino = calloc((size_t)nfiles, sizeof(*many_ino));
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < nfiles; i++) {
        char rel[64];
        struct stat st;
        snprintf(rel, sizeof(rel), "many/f%05d", i);
        if (stat(path(rel), &st))
            die(rel);
        many_ino[i] = st.st_ino;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    say("many=%d\nmany_stat_ms=%ld\n", nfiles,
        (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000);
    say("listed=%s\nlist_eof=%d\n", listed ? listed : "", list_eof);
}

static void drop_cache(int fd)
{
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
}

/* one line: "ok:TEXT" (TEXT up to its first newline or NUL) or "err:ERRNO-NAME" */
static void read_line(const char *key, int fd)
{
    char buf[65] = {0};
    drop_cache(fd);
    ssize_t n = pread(fd, buf, 64, 0);
    if (n < 0) {
        say("%s=err:%s\n", key, strerrorname_np(errno));
        return;
    }
    buf[strcspn(buf, "\n")] = 0;
    say("%s=ok:%s\n", key, buf);
}

static void write_result(const char *key, ssize_t n, size_t want)
{
    if (n == (ssize_t)want)
        say("%s=ok\n", key);
    else
        say("%s=err:%s\n", key, n < 0 ? strerrorname_np(errno) : "short");
}

static void check(int seq)
{
    char text[64];
    say("seq=%d\n", seq);
    read_line("rw_read", held_fd[H_RW]);
    char label[32];
    snprintf(label, sizeof(label), "guest-rw-%d", seq);
    snprintf(text, sizeof(text), "%-31s\n", label); /* 32 bytes */
    write_result("rw_write", pwrite(held_fd[H_RW], text, 32, 1024), 32);
    read_line("ro_read", held_fd[H_RO]);
    int len = snprintf(text, sizeof(text), "append-%d\n", seq);
    write_result("app_write", write(held_fd[H_APP], text, len), len);
    snprintf(map + 64 * seq, 64, "map-%d", seq);
    say("map_sync=%s\n", msync(map, MAP_LEN, MS_SYNC) ? strerrorname_np(errno) : "ok");
    char rel[32];
    snprintf(rel, sizeof(rel), "cwd-%d", seq); /* relative: lands in the cwd, sub/ */
    int fd = open(rel, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    len = snprintf(text, sizeof(text), "cwd-%d\n", seq);
    if (fd < 0)
        say("cwd_write=err:%s\n", strerrorname_np(errno));
    else {
        write_result("cwd_write", write(fd, text, len), len);
        close(fd);
    }
    int changed = 0;
    for (int h = 0; h < H_COUNT; h++) {
        struct stat st;
        if (held_fd[h] < 0 || h == H_GONE)
            continue;
        if (fstat(held_fd[h], &st)) {
            say("fstat_%s=err:%s\n", held_names[h], strerrorname_np(errno));
            changed++;
        } else if (st.st_ino != held_ino[h]) {
            say("ino_%s_now=%lu\n", held_names[h], (unsigned long)st.st_ino);
            changed++;
        }
    }
    say("held_ino_changed=%d\n", changed);
    int many_changed = 0, many_errors = 0;
    for (int i = 0; i < nfiles; i++) {
        struct stat st;
        snprintf(rel, sizeof(rel), "many/f%05d", i);
        if (stat(path(rel), &st))
            many_errors++;
        else if (st.st_ino != many_ino[i])
            many_changed++;
    }
    say("many_ino_changed=%d\nmany_errors=%d\n", many_changed, many_errors);
    if (with_unlinked) {
        read_line("gone_read", held_fd[H_GONE]);
        write_result("gone_write", pwrite(held_fd[H_GONE], "x", 1, 100), 1);
    }
    if (!list_eof)
        list_more(0);
    say("listed=%s\nlist_eof=%d\n", listed ? listed : "", list_eof);
    say("direct_count=%ld\ndirect_errors=%ld\n", writer->count, writer->errors);
}

static void finish(int seq)
{
    int status = 0;
    say("seq=%d\n", seq);
    writer->stop = 1;
    waitpid(writer_pid, &status, 0);
    say("direct_count=%ld\ndirect_errors=%ld\ndirect_errno=%s\n", writer->count,
        writer->errors, writer->last_errno ? strerrorname_np(writer->last_errno) : "0");
    list_more(1);
    say("listed=%s\nlist_eof=%d\n", listed ? listed : "", list_eof);
    say("unlock_flock=%s\n", flock(held_fd[H_FLK], LOCK_UN) ? strerrorname_np(errno) : "ok");
    say("unlock_fcntl=%s\n",
        whole_file_lock(held_fd[H_PLK], F_UNLCK) ? strerrorname_np(errno) : "ok");
    munmap(map, MAP_LEN);
    for (int h = 0; h < H_COUNT; h++)
        if (held_fd[h] >= 0)
            close(held_fd[h]);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: migholder MNT NFILES [unlinked]\n");
        return 2;
    }
    mnt = argv[1];
    nfiles = atoi(argv[2]);
    with_unlinked = argc > 3 && strcmp(argv[3], "unlinked") == 0;
    cmd_fd = open(path("ctl/cmd"), O_RDONLY);
    if (cmd_fd < 0)
        die("ctl/cmd");
    setup();
    publish(0);
    int seen = 0;
    struct timespec poll = {0, 20 * 1000 * 1000};
    for (;;) {
        char buf[65] = {0}, word[32] = {0};
        int seq = 0;
        drop_cache(cmd_fd);
        if (pread(cmd_fd, buf, 64, 0) > 0 && sscanf(buf, "%d %31s", &seq, word) == 2 &&
            seq > seen) {
            seen = seq;
            if (strcmp(word, "finish") == 0) {
                finish(seq);
                publish(seq);
                return 0;
            }
            check(seq);
            publish(seq);
        }
        nanosleep(&poll, NULL);
    }
}
