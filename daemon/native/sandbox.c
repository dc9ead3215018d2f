/* The processes around the sandboxed server that only wait: the process outside (the
   one the operator started) and the keeper (workers/handover/keeper.py). Both are forks
   of the daemon as it was at the split, so they share every page of the interpreter's
   heap with the server; each page the server writes afterwards is copied, and the
   original stays theirs (5 MB with one queue, measured). So from the fork on they run no
   Python at all: they give their copy of the heap back to the kernel (drop_heap), wait
   here, and at the event that ends the wait execute the daemon afresh, which does in
   Python what the event needs (daemon/host/sandbox.py, "the split"). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

#define CHILD_EXITED 0
#define CHILD_HUP 1
#define CHILD_FD_READY 2

/* A process that only waits for the server it started waits here, in C. SIGTERM and
   SIGINT are forwarded to the child; SIGHUP is forwarded and returned (a live upgrade);
   ``fd`` (-1: none) becoming readable is returned. The three signals and SIGCHLD are
   blocked while it waits and the caller's mask is back on return, so one that arrives
   while Python runs reaches its handler. Without an fd it sleeps in sigwaitinfo (no fd of
   its own: the keeper shares the server's fd table); with one, in poll on that fd and a
   signalfd. Returns CHILD_EXITED with the wait status in *status, CHILD_HUP,
   CHILD_FD_READY, or -errno. */
static int pyvfs_wait_child(int pid, int fd, int *status) {
    sigset_t wanted, old;
    sigemptyset(&wanted);
    sigaddset(&wanted, SIGTERM);
    sigaddset(&wanted, SIGINT);
    sigaddset(&wanted, SIGHUP);
    sigaddset(&wanted, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &wanted, &old) < 0)
        return -errno;
    int sfd = -1, ret;
    if (fd >= 0 && (sfd = signalfd(-1, &wanted, SFD_CLOEXEC)) < 0) {
        ret = -errno;
        goto out;
    }
    for (;;) {
        pid_t r = waitpid(pid, status, WNOHANG); /* after blocking: no SIGCHLD is lost */
        if (r == pid) {
            ret = CHILD_EXITED;
            break;
        }
        if (r < 0 && errno != EINTR) {
            ret = -errno;
            break;
        }
        int sig = 0;
        if (sfd >= 0) {
            struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = sfd, .events = POLLIN}};
            if (poll(p, 2, -1) < 0 && errno != EINTR) {
                ret = -errno;
                break;
            }
            if (p[1].revents & POLLIN) {
                struct signalfd_siginfo info;
                if (read(sfd, &info, sizeof info) == (ssize_t)sizeof info)
                    sig = (int)info.ssi_signo;
            } else if (p[0].revents) {
                ret = CHILD_FD_READY;
                break;
            }
        } else {
            sig = sigwaitinfo(&wanted, NULL);
        }
        if (sig == SIGTERM || sig == SIGINT || sig == SIGHUP)
            kill(pid, sig);
        if (sig == SIGHUP) {
            ret = CHILD_HUP;
            break;
        }
    }
out:
    if (sfd >= 0)
        close(sfd);
    sigprocmask(SIG_SETMASK, &old, NULL);
    return ret;
}

/* Numbers read and written by hand: after drop_heap the C library's locale (malloc'd by
   setlocale, which CPython calls at start-up) is gone, and sscanf, strtol and snprintf
   consult it. */
static const char *hex(const char *p, unsigned long *out) {
    unsigned long v = 0;
    for (;; p++) {
        int d = *p >= '0' && *p <= '9' ? *p - '0'
                : *p >= 'a' && *p <= 'f' ? *p - 'a' + 10 : -1;
        if (d < 0)
            break;
        v = v * 16 + (unsigned long)d;
    }
    *out = v;
    return p;
}

static const char *skip_field(const char *p) {
    while (*p && *p != ' ')
        p++;
    while (*p == ' ')
        p++;
    return p;
}

/* ``value`` in decimal at ``out`` (room for 12); returns the end. */
static char *decimal(char *out, long value) {
    char tmp[24];
    int n = 0, neg = value < 0;
    unsigned long v = neg ? (unsigned long)-value : (unsigned long)value;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (neg)
        *out++ = '-';
    while (n)
        *out++ = tmp[--n];
    *out = '\0';
    return out;
}

/* ---- executing the daemon afresh ------------------------------------------------- */

#define PLAN_SLOTS 2 /* environment entries an event adds */

/* The program to execute, copied out of Python's memory before that is dropped. */
struct plan {
    char *exe;
    char **argv;
    char **envp; /* PLAN_SLOTS free entries at the end, then NULL */
    int envc;
    char slot[PLAN_SLOTS][96];
    void *region;
    size_t region_len;
};

static struct plan plan; /* in the library's .bss: never dropped */

/* ``blob``: the executable, argc arguments and envc environment entries, each ended by a
   NUL. Returns 0, or -1 if it does not parse. */
static int plan_load(const char *blob, size_t len, int argc, int envc) {
    size_t pointers = (size_t)(argc + 1 + envc + PLAN_SLOTS + 1) * sizeof(char *);
    size_t size = (len + pointers + 4095) & ~(size_t)4095;
    char *region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED)
        return -1;
    char **vec = (char **)region;
    char *text = region + pointers;
    memcpy(text, blob, len);
    if (len == 0 || text[len - 1] != '\0')
        return -1;
    char *p = text, *end = text + len;
    plan.exe = p;
    p += strlen(p) + 1;
    for (int i = 0; i < argc + envc; i++) {
        if (p >= end)
            return -1;
        vec[i < argc ? i : i + 1] = p;
        p += strlen(p) + 1;
    }
    vec[argc] = NULL;
    plan.argv = vec;
    plan.envp = vec + argc + 1;
    plan.envc = envc;
    for (int i = 0; i <= PLAN_SLOTS; i++)
        plan.envp[envc + i] = NULL;
    plan.region = region;
    plan.region_len = size;
    return 0;
}

/* Add NAME=A[:B] for the program executed next (slot < PLAN_SLOTS; B only if ``two``). */
static void plan_env(int slot, const char *name, long a, long b, int two) {
    char *p = plan.slot[slot];
    size_t n = strlen(name);
    if (n > sizeof plan.slot[slot] - 28)
        n = sizeof plan.slot[slot] - 28;
    memcpy(p, name, n);
    p += n;
    *p++ = '=';
    p = decimal(p, a);
    if (two) {
        *p++ = ':';
        decimal(p, b);
    }
    plan.envp[plan.envc + slot] = plan.slot[slot];
}

static void say(const char *what) {
    ssize_t ignored = write(2, what, strlen(what));
    (void)ignored;
}

/* Execute the plan; never returns (exits ``code`` if it cannot). */
static void plan_exec(int code) {
    execve(plan.exe, plan.argv, plan.envp);
    say("pyvirtiofsd: cannot execute the daemon again to finish; exiting\n");
    _exit(code);
}

static void inheritable(int fd) {
    int flags = fcntl(fd, F_GETFD);
    if (flags >= 0)
        fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
}

/* Every fd open here survives the next execve (the keeper's, whose table is the dead
   server's: the new program sends what it must keep to the process outside). */
static void all_inheritable(void) {
    int dir = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0)
        return;
    char buf[4096];
    long n;
    while ((n = syscall(SYS_getdents64, dir, buf, sizeof buf)) > 0) {
        for (long off = 0; off < n;) {
            struct dirent64 *d = (struct dirent64 *)(buf + off);
            off += d->d_reclen;
            long fd = 0;
            const char *c = d->d_name;
            for (; *c >= '0' && *c <= '9'; c++)
                fd = fd * 10 + (*c - '0');
            if (*c == '\0' && c != d->d_name && fd != dir)
                inheritable((int)fd);
        }
    }
    close(dir);
}

/* ---- giving the heap back ------------------------------------------------------------- */

/* Where each loaded object's writable segments end (their .bss runs on into the
   anonymous mapping after the file's; mmap places later mappings right after it, and the
   kernel merges them into one). Read before drop_heap, which gives back the dynamic
   linker's list. */
#define MAX_SEGMENTS 1024
static uintptr_t segment_end[MAX_SEGMENTS];
static int segments;

static int note_segments(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    (void)data;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_W))
            continue;
        if (segments == MAX_SEGMENTS)
            return 1; /* too many to know them all: drop_heap then gives nothing back */
        segment_end[segments++] = info->dlpi_addr + ph->p_vaddr + ph->p_memsz;
    }
    return 0;
}

/* MADV_DONTNEED on [from, end) less the plan's region (the kernel may have merged its
   mapping with a neighbour). */
static void give_back(uintptr_t from, uintptr_t end) {
    uintptr_t lo = (uintptr_t)plan.region, hi = lo + plan.region_len;
    if (plan.region != NULL && lo < end && hi > from) {
        if (from < lo)
            madvise((void *)from, lo - from, MADV_DONTNEED);
        if (hi < end)
            madvise((void *)hi, end - hi, MADV_DONTNEED);
        return;
    }
    if (from < end)
        madvise((void *)from, end - from, MADV_DONTNEED);
}

/* Give back (MADV_DONTNEED) this process's copy of the interpreter's heap: the writable,
   private, anonymous memory (pymalloc's arenas, malloc's, "[heap]") except the stack,
   the thread's TLS block and the loaded objects' .bss. Nothing here may touch that memory
   afterwards: no Python, no malloc, no locale (sscanf, strtol, printf); what runs until
   the execve uses the stack, the libraries' own data and the plan's region. */
static void drop_heap(void) {
    segments = 0;
    if (dl_iterate_phdr(note_segments, NULL) != 0)
        return;
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    uintptr_t tp = (uintptr_t)__builtin_thread_pointer();
    uintptr_t here = (uintptr_t)&fd;
    char buf[16384];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(fd, buf + have, sizeof buf - 1 - have);
        if (n <= 0)
            break;
        have += (size_t)n;
        buf[have] = '\0';
        char *line = buf;
        char *nl;
        while ((nl = strchr(line, '\n')) != NULL) {
            *nl = '\0';
            unsigned long start, end, inode;
            const char *p = hex(line, &start);
            if (*p == '-') {
                p = hex(p + 1, &end);
                while (*p == ' ')
                    p++;
                const char *perms = p;
                p = skip_field(skip_field(skip_field(p))); /* perms, offset, device */
                inode = 0;
                for (; *p >= '0' && *p <= '9'; p++)
                    inode = inode * 10 + (unsigned long)(*p - '0');
                while (*p == ' ')
                    p++;
                const char *name = p;
                int anon = inode == 0 && (name[0] == '\0' || strcmp(name, "[heap]") == 0);
                int holds_tp = tp + 65536 > start && tp < end + 65536;
                int holds_stack = here >= start && here < end;
                if (anon && strncmp(perms, "rw-p", 4) == 0 && !holds_tp && !holds_stack) {
                    uintptr_t from = start; /* past any object's .bss that runs into it */
                    for (int i = 0; i < segments; i++) {
                        uintptr_t e = (segment_end[i] + 4095) & ~(uintptr_t)4095;
                        if (segment_end[i] >= start && segment_end[i] < end && e > from)
                            from = e;
                    }
                    give_back(from, end);
                }
            }
            line = nl + 1;
        }
        have = strlen(line);
        memmove(buf, line, have);
    }
    close(fd);
}

/* ---- the split ------------------------------------------------------------------------ */

/* The process outside, from the fork on: wait, then execute the daemon afresh for
   what ended the wait. A live upgrade (SIGHUP, or the server handing its fds over): the
   new program, with PYVIRTIOFSD_SUCCESSOR=<socket fd>:<server pid, -1 if gone>, takes the
   fds and serves (daemon/host/sandbox.py take_from_server). The server's exit: with
   PYVIRTIOFSD_SERVER_EXITED=<status> it removes the socket, pid file and tables and exits
   with that status. */
static void outside(const pyvfs_split_t *s, pid_t child) {
    int sock = s->watch_fd;
    for (;;) {
        int status = 0;
        int event = pyvfs_wait_child(child, sock, &status);
        if (event == CHILD_HUP && !(s->exec_first && sock >= 0))
            continue; /* forwarded: the server stops its workers, then sends */
        if (event == CHILD_HUP || event == CHILD_FD_READY) {
            inheritable(sock);
            signal(SIGHUP, SIG_IGN); /* until the new program has its handler */
            plan_env(0, "PYVIRTIOFSD_SUCCESSOR", sock, child, 1);
            plan_exec(1);
        }
        int code = event < 0 ? 1 : WIFEXITED(status) ? WEXITSTATUS(status) : 1;
        if (code == s->handed_over && sock >= 0) {
            inheritable(sock);
            signal(SIGHUP, SIG_IGN);
            plan_env(0, "PYVIRTIOFSD_SUCCESSOR", sock, -1, 1);
            plan_env(1, "PYVIRTIOFSD_SERVER_EXITED", code, 0, 0);
            plan_exec(1);
        }
        if (s->journal_fd >= 0)
            inheritable(s->journal_fd);
        plan_env(0, "PYVIRTIOFSD_SERVER_EXITED", code, 0, 0);
        plan_exec(code);
    }
}

/* The keeper, from its clone of the server on: wait; a server that exited is followed
   (its status); one killed by a signal leaves its fd table here, which the daemon
   executed afresh with PYVIRTIOFSD_KEEPER=<server pid>:<wait status> hands to the process
   outside (workers/handover/keeper.py). */
static void keeper(pid_t server) {
    int status = 0, event;
    while ((event = pyvfs_wait_child(server, -1, &status)) != CHILD_EXITED) {
        if (event < 0)
            _exit(1); /* not our child: cannot be */
    }
    if (WIFEXITED(status))
        _exit(WEXITSTATUS(status));
    all_inheritable();
    plan_env(0, "PYVIRTIOFSD_KEEPER", server, status, 1);
    plan_exec(1);
}

/* The sandbox's split (daemon/host/sandbox.py _split), in C from the fork on: the
   process has one thread here and holds no lock of the interpreter's, so CPython's fork
   bookkeeping has nothing to repair, and none of its writes are made.

   fork(); the parent tells the child it is alive (a byte on ready_w); the child arms
   PR_SET_PDEATHSIG and waits for that byte, so a parent that died first is seen as end
   of file (exit 1). The child clones the server with CLONE_FILES (one fd table for both;
   0 is returned there, PDEATHSIG armed) and stays as its keeper: named pyvfs-keeper,
   subreaper of the server's orphans. The parent and the keeper give their heap back and
   never return: the parent is the process outside (outside()), or with parent_exits the
   helper of an unprivileged sandbox, which only exits with the keeper's status. -errno
   if the plan does not parse or the fork fails. */
long pyvfs_split(pyvfs_split_t *arg) {
    /* a copy on the stack: ``arg`` is in Python's memory, which drop_heap gives back */
    pyvfs_split_t opts = *arg, *s = &opts;
    if (s->plan == NULL || plan_load(s->plan, s->plan_len, s->argc, s->envc) < 0)
        return -EINVAL;
    pid_t child = fork();
    if (child < 0)
        return -errno;
    if (child > 0) {
        close(s->ready_r);
        if (write(s->ready_w, "1", 1) != 1) {
            /* the child sees end of file and exits: the wait below sees its status */
        }
        close(s->ready_w);
        drop_heap();
        if (s->parent_exits) {
            int status = 0, event;
            while ((event = pyvfs_wait_child(child, -1, &status)) != CHILD_EXITED) {
                if (event < 0)
                    _exit(1);
            }
            _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 1);
        }
        outside(s, child);
    }
    close(s->ready_w);
    char alive = 0;
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 || read(s->ready_r, &alive, 1) != 1 ||
        alive != '1')
        _exit(1); /* the parent is gone */
    close(s->ready_r);
    long server = syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
    if (server < 0)
        _exit(1);
    if (server == 0) {
        pyvfs_set_pdeathsig(SIGKILL); /* the server goes with its keeper */
        munmap(plan.region, plan.region_len); /* the server's copy: not needed there */
        return 0;
    }
    prctl(PR_SET_NAME, "pyvfs-keeper", 0, 0, 0);
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); /* the workers come to us (chroot) */
    drop_heap();
    keeper((pid_t)server);
    return 0; /* not reached: keeper() executes or exits */
}

/* The process outside of an unprivileged sandbox (daemon/host/sandbox.py
   _enter_as_user), once its helper has the namespaces and their id maps: from here as
   outside() in pyvfs_split, with ``child`` the helper. Never returns; -errno would be
   the plan not parsing, which it then reports by exiting 1. */
void pyvfs_outside(pyvfs_split_t *arg, int child) {
    pyvfs_split_t opts = *arg; /* ``arg`` is in Python's memory, which drop_heap gives back */
    if (plan_load(opts.plan, opts.plan_len, opts.argc, opts.envc) < 0) {
        say("pyvirtiofsd: bad plan for the process outside\n");
        _exit(1);
    }
    drop_heap();
    outside(&opts, (pid_t)child);
}
