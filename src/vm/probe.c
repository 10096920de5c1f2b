/* probe: what this host offers the hypervisor drivers: whether KVM really
 * runs guests, and what the QEMU program is and supports (docs/qemu.md).
 *
 * KVM: /dev/kvm answering its ioctls is not enough.  On some hosts (a VM
 * without nested virtualization whose kernel offers a software KVM, such as
 * PVM's kvm_pvm) KVM_CREATE_VM, KVM_CREATE_VCPU and even a KVM_RUN to a
 * `hlt` all succeed, yet every guest instruction is emulated: SeaBIOS
 * limps, a Linux kernel takes minutes to decompress.  So the check runs a
 * loop of a few million instructions in 64-bit mode and calls KVM usable
 * only if it finishes within a budget that hardware virtualization meets a
 * hundred times over.  It runs in a child process (an interval timer
 * interrupts a KVM_RUN that is too slow; nothing of it touches ferryd's
 * signals or memory) and its verdict is cached for the process.
 *
 * QEMU: started with -machine none (no guest, nothing opened) and asked
 * over QMP; then quit. */
#include "vm/driver.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/kvm.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "vm/qmp.h"

#define KVM_LOOP_ITERATIONS 2000000u   /* 4M guest instructions */
#define KVM_BUDGET_MS       500        /* hardware does them in a few ms */
#define KVM_CHILD_TIMEOUT_MS 5000
#define PROBE_TIMEOUT_MS    15000

/* ---- helpers ---- */

int vm_find_program(const char *name, char *out, size_t len)
{
  if (!name || !name[0]) {
    fmt_into(out, len, "(none)");
    return -ENOENT;
  }
  if (strchr(name, '/')) {
    fmt_into(out, len, "%s", name);
    return access(name, X_OK) == 0 ? 0 : -ENOENT;
  }
  const char *path = getenv("PATH");
  char *copy = strdup(path ? path : "/usr/local/bin:/usr/bin:/bin"), *save = NULL;
  for (char *d = copy ? strtok_r(copy, ":", &save) : NULL; d; d = strtok_r(NULL, ":", &save)) {
    if (fmt_into(out, len, "%s/%s", d, name) == 0 && access(out, X_OK) == 0) {
      free(copy);
      return 0;
    }
  }
  free(copy);
  fmt_into(out, len, "%s", name);
  return -ENOENT;
}

void vm_log_tail(const char *path, char *out, size_t len)
{
  out[0] = '\0';
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return;
  off_t size = lseek(fd, 0, SEEK_END);
  off_t from = size > 480 ? size - 480 : 0;
  char buf[481];
  ssize_t n = pread(fd, buf, sizeof buf - 1, from);
  close(fd);
  if (n <= 0)
    return;
  buf[n] = '\0';
  char *p = buf, *nl;
  if (from > 0 && (nl = strchr(buf, '\n')) && nl[1])
    p = nl + 1;
  size_t l = strlen(p);
  while (l && (p[l - 1] == '\n' || p[l - 1] == ' '))
    p[--l] = '\0';
  for (char *q = p; *q; q++)
    if (*q == '\n')
      *q = ' ';
  snprintf(out, len, "%s", p);
}

/* ---- KVM ---- */

enum kvm_stage {
  KS_OK, KS_OPEN, KS_API, KS_CREATE_VM, KS_MEMORY, KS_CREATE_VCPU, KS_MMAP_RUN, KS_REGS,
  KS_RUN, KS_EXIT, KS_SLOW,
};

struct kvm_result {
  int stage;                 /* enum kvm_stage: the first step that failed */
  int err;                   /* its errno */
  int api;                   /* KVM_GET_API_VERSION */
  int exit_reason;           /* KS_EXIT: what KVM_RUN returned for */
  uint64_t elapsed_ns;
  uint64_t iterations_done;  /* KS_SLOW: how far the loop got */
};

static void on_alarm(int sig) { (void)sig; }

static uint64_t mono_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* In the child: only system calls, no allocation. */
static void kvm_try(struct kvm_result *res)
{
  memset(res, 0, sizeof *res);
  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) {
    res->stage = KS_OPEN;
    res->err = errno;
    return;
  }
  res->api = ioctl(kvm, KVM_GET_API_VERSION, 0);
  if (res->api != KVM_API_VERSION) {
    res->stage = KS_API;
    res->err = res->api < 0 ? errno : 0;
    return;
  }
  int vm = ioctl(kvm, KVM_CREATE_VM, 0);
  if (vm < 0) {
    res->stage = KS_CREATE_VM;
    res->err = errno;
    return;
  }
  const size_t memsz = 0x200000;
  uint8_t *mem = mmap(NULL, memsz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  struct kvm_userspace_memory_region region = {
    .slot = 0, .guest_phys_addr = 0, .memory_size = memsz, .userspace_addr = (uintptr_t)mem,
  };
  if (mem == MAP_FAILED || ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) {
    res->stage = KS_MEMORY;
    res->err = errno;
    return;
  }
  int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
  if (vcpu < 0) {
    res->stage = KS_CREATE_VCPU;
    res->err = errno;
    return;
  }
  int runsz = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  struct kvm_run *run = runsz > 0 ? mmap(NULL, (size_t)runsz, PROT_READ | PROT_WRITE,
                                         MAP_SHARED, vcpu, 0) : MAP_FAILED;
  if (run == MAP_FAILED) {
    res->stage = KS_MMAP_RUN;
    res->err = errno;
    return;
  }
  /* 64-bit mode, identity-mapped first 2 MiB (one large page):
   *   mov $N, %ecx; 1: dec %ecx; jnz 1b; hlt */
  const uint32_t n = KVM_LOOP_ITERATIONS;
  const uint8_t code[] = { 0xb9, n & 0xff, (n >> 8) & 0xff, (n >> 16) & 0xff, n >> 24,
                           0xff, 0xc9, 0x75, 0xfc, 0xf4 };
  memcpy(mem + 0x1000, code, sizeof code);
  uint64_t *pml4 = (uint64_t *)(mem + 0x2000), *pdpt = (uint64_t *)(mem + 0x3000),
           *pd = (uint64_t *)(mem + 0x4000);
  pml4[0] = 0x3000 | 3;
  pdpt[0] = 0x4000 | 3;
  pd[0] = 0x83;                               /* present, writable, 2 MiB page */
  struct kvm_sregs sregs;
  if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) {
    res->stage = KS_REGS;
    res->err = errno;
    return;
  }
  struct kvm_segment seg = { .base = 0, .limit = 0xffffffff, .selector = 1 << 3, .present = 1,
                             .type = 11, .dpl = 0, .db = 0, .s = 1, .l = 1, .g = 1 };
  sregs.cs = seg;
  seg.type = 3;
  seg.selector = 2 << 3;
  seg.l = 0;
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = seg;
  sregs.cr3 = 0x2000;
  sregs.cr4 = 1 << 5;                         /* PAE */
  sregs.cr0 = 0x80050033;                     /* PG, PE, and the usual */
  sregs.efer = 0x500;                         /* LME, LMA */
  struct kvm_regs regs = { .rip = 0x1000, .rflags = 2, .rsp = 0x8000 };
  if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0 || ioctl(vcpu, KVM_SET_REGS, &regs) < 0) {
    res->stage = KS_REGS;
    res->err = errno;
    return;
  }
  struct sigaction sa = { .sa_handler = on_alarm };       /* no SA_RESTART: KVM_RUN returns */
  sigaction(SIGALRM, &sa, NULL);
  sigset_t alrm;
  sigemptyset(&alrm);
  sigaddset(&alrm, SIGALRM);
  sigprocmask(SIG_UNBLOCK, &alrm, NULL);
  struct itimerval it = { .it_value = { .tv_sec = KVM_BUDGET_MS / 1000,
                                        .tv_usec = (KVM_BUDGET_MS % 1000) * 1000 } };
  uint64_t t0 = mono_ns();
  setitimer(ITIMER_REAL, &it, NULL);
  int r;
  for (;;) {
    r = ioctl(vcpu, KVM_RUN, 0);
    /* An IO or MMIO exit is not expected, but neither fatal: run on. */
    if (r == 0 && (run->exit_reason == KVM_EXIT_IO || run->exit_reason == KVM_EXIT_MMIO) &&
        mono_ns() - t0 < (uint64_t)KVM_BUDGET_MS * 1000000)
      continue;
    break;
  }
  res->elapsed_ns = mono_ns() - t0;
  ioctl(vcpu, KVM_GET_REGS, &regs);
  res->iterations_done = n - (uint32_t)regs.rcx;
  if (r < 0 && errno == EINTR) {
    res->stage = KS_SLOW;
    return;
  }
  if (r < 0) {
    res->stage = KS_RUN;
    res->err = errno;
    return;
  }
  if (run->exit_reason != KVM_EXIT_HLT) {
    res->stage = KS_EXIT;
    res->exit_reason = (int)run->exit_reason;
    return;
  }
  res->stage = res->elapsed_ns > (uint64_t)KVM_BUDGET_MS * 1000000 ? KS_SLOW : KS_OK;
}

static void kvm_explain(const struct kvm_result *res, struct vm_kvm_status *out)
{
  static const char *const step[] = {
    [KS_OPEN] = "open /dev/kvm", [KS_API] = "KVM_GET_API_VERSION",
    [KS_CREATE_VM] = "KVM_CREATE_VM", [KS_MEMORY] = "KVM_SET_USER_MEMORY_REGION",
    [KS_CREATE_VCPU] = "KVM_CREATE_VCPU", [KS_MMAP_RUN] = "mmap of the vCPU run area",
    [KS_REGS] = "setting the vCPU registers", [KS_RUN] = "KVM_RUN",
  };
  out->present = true;
  out->usable = false;
  struct stat st;
  bool pvm = stat("/sys/module/kvm_pvm", &st) == 0;
  switch (res->stage) {
  case KS_OK:
    out->usable = true;
    snprintf(out->why, sizeof out->why, "ok: %u guest loop iterations in %.1f ms",
             KVM_LOOP_ITERATIONS, (double)res->elapsed_ns / 1e6);
    return;
  case KS_OPEN:
    out->present = res->err != ENOENT && res->err != ENODEV && res->err != ENXIO;
    if (res->err == EACCES || res->err == EPERM)
      snprintf(out->why, sizeof out->why, "no permission to open /dev/kvm (%s): give ferryd's "
               "user the kvm group", strerror(res->err));
    else if (!out->present)
      snprintf(out->why, sizeof out->why, "no /dev/kvm: the kvm module is not loaded, or the "
               "host has no hardware virtualization");
    else
      snprintf(out->why, sizeof out->why, "cannot open /dev/kvm: %s", strerror(res->err));
    return;
  case KS_API:
    snprintf(out->why, sizeof out->why, "KVM_GET_API_VERSION answered %d, not %d", res->api,
             KVM_API_VERSION);
    return;
  case KS_EXIT:
    snprintf(out->why, sizeof out->why, "a test guest's KVM_RUN ended with exit reason %d "
             "instead of its hlt%s", res->exit_reason, pvm ? " (the host's KVM is kvm_pvm)" : "");
    return;
  case KS_SLOW:
    snprintf(out->why, sizeof out->why, "KVM emulates instead of virtualizing: a test guest ran "
             "%llu of %u loop iterations in %u ms (hardware does them in a few ms)%s",
             (unsigned long long)res->iterations_done, KVM_LOOP_ITERATIONS, KVM_BUDGET_MS,
             pvm ? "; the host's KVM is kvm_pvm, a software KVM" : "");
    return;
  default:
    snprintf(out->why, sizeof out->why, "%s failed: %s", res->stage < (int)ARRAY_SIZE(step) &&
             step[res->stage] ? step[res->stage] : "the KVM check", strerror(res->err));
    return;
  }
}

static void kvm_check_now(struct vm_kvm_status *out)
{
  memset(out, 0, sizeof *out);
  struct stat st;
  if (stat("/dev/kvm", &st) < 0) {
    snprintf(out->why, sizeof out->why, "no /dev/kvm: the kvm module is not loaded, or the host "
             "has no hardware virtualization");
    return;
  }
  int p[2];
  if (pipe2(p, O_CLOEXEC) < 0) {
    out->present = true;
    snprintf(out->why, sizeof out->why, "the KVM check could not run: pipe: %s", strerror(errno));
    return;
  }
  pid_t pid = fork();
  if (pid == 0) {
    close(p[0]);
    struct kvm_result res;
    kvm_try(&res);
    ssize_t w = write(p[1], &res, sizeof res);
    _exit(w == (ssize_t)sizeof res ? 0 : 1);
  }
  close(p[1]);
  if (pid < 0) {
    close(p[0]);
    out->present = true;
    snprintf(out->why, sizeof out->why, "the KVM check could not run: fork: %s", strerror(errno));
    return;
  }
  struct kvm_result res;
  ssize_t n = 0;
  struct pollfd pf = { .fd = p[0], .events = POLLIN };
  int pr;
  do
    pr = poll(&pf, 1, KVM_CHILD_TIMEOUT_MS);
  while (pr < 0 && errno == EINTR);
  if (pr > 0)
    n = read_full(p[0], &res, sizeof res) == 0 ? (ssize_t)sizeof res : 0;
  close(p[0]);
  if (pr <= 0)
    kill(pid, SIGKILL);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
    ;
  if (n != (ssize_t)sizeof res) {
    out->present = true;
    snprintf(out->why, sizeof out->why, "the KVM check %s", pr <= 0 ? "hung (a KVM_RUN that "
             "never returned)" : WIFSIGNALED(status) ? "crashed" : "gave no answer");
    return;
  }
  kvm_explain(&res, out);
}

static pthread_mutex_t kvm_lock = PTHREAD_MUTEX_INITIALIZER;
static bool kvm_cached;
static struct vm_kvm_status kvm_cache;

void vm_kvm_check(bool refresh, struct vm_kvm_status *out)
{
  pthread_mutex_lock(&kvm_lock);
  if (!kvm_cached || refresh) {
    kvm_check_now(&kvm_cache);
    kvm_cached = true;
    log_info(NULL, "KVM %s: %s", kvm_cache.usable ? "usable" : "unusable", kvm_cache.why);
  }
  *out = kvm_cache;
  pthread_mutex_unlock(&kvm_lock);
}

/* ---- QEMU ---- */

static uint64_t mem_available(void)
{
  FILE *f = fopen("/proc/meminfo", "re");
  if (!f)
    return 0;
  char line[256];
  unsigned long long kb = 0;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1)
      break;
  fclose(f);
  return (uint64_t)kb * 1024;
}

static bool in_array(json_t *a, const char *s)
{
  size_t i;
  json_t *x;
  json_array_foreach(a, i, x) {
    if (strcmp(json_string_value(x), s) == 0)
      return true;
  }
  return false;
}

static int cmp_str(const void *a, const void *b)
{
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The strings of a JSON array, sorted: QEMU's own order means nothing. */
static json_t *sorted(json_t *arr)
{
  size_t n = json_array_size(arr);
  const char **v = calloc(n ? n : 1, sizeof *v);
  json_t *out = json_array();
  if (v) {
    for (size_t i = 0; i < n; i++)
      v[i] = json_string_value(json_array_get(arr, i));
    qsort(v, n, sizeof *v, cmp_str);
    for (size_t i = 0; i < n; i++)
      json_array_append_new(out, json_string(v[i]));
  }
  free(v);
  json_decref(arr);
  return out;
}

static json_t *probe_fail(json_t *j, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static json_t *probe_fail(json_t *j, const char *fmt, ...)
{
  char why[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof why, fmt, ap);
  va_end(ap);
  json_object_set_new(j, "present", json_false());
  json_object_set_new(j, "why", json_string(why));
  return j;
}

json_t *vm_probe_qemu(const char *program, const char *run_dir)
{
  static unsigned counter;
  char path[PATH_MAX];
  int found = vm_find_program(program, path, sizeof path);
  json_t *j = json_pack("{s:s, s:s}", "driver", "qemu", "program", path);
  struct vm_kvm_status kvm;
  vm_kvm_check(false, &kvm);
  json_object_set_new(j, "kvm", json_pack("{s:b, s:b, s:s}", "present", kvm.present, "usable",
                                          kvm.usable, "why", kvm.why));
  json_object_set_new(j, "accel", json_string(kvm.usable ? "kvm" : "tcg"));
  json_object_set_new(j, "mem_available", json_integer((json_int_t)mem_available()));
  if (found < 0)
    return probe_fail(j, "QEMU program '%s' not found (ferryd --qemu PATH)", program);

  /* Names of VMs cannot start with '.', so this never is a VM's socket. */
  char sock[PATH_MAX], logp[PATH_MAX];
  unsigned k = __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED);
  if (fmt_into(sock, sizeof sock, "%s/.probe-%d-%u.qmp", run_dir, (int)getpid(), k) < 0 ||
      strlen(sock) >= 108 ||
      fmt_into(logp, sizeof logp, "%s/.probe-%d-%u.log", run_dir, (int)getpid(), k) < 0)
    return probe_fail(j, "the probe's QMP socket path in %s is longer than 107 bytes", run_dir);
  char qmparg[PATH_MAX + 32];
  snprintf(qmparg, sizeof qmparg, "unix:%s,server=on,wait=off", sock);
  const char *argv[] = { path, "-machine", "none", "-nodefaults", "-display", "none",
                         "-no-user-config", "-S", "-qmp", qmparg, NULL };
  unlink(sock);
  int logfd = open(logp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  pid_t pid = fork();
  if (pid == 0) {
    setsid();
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    int devnull = open("/dev/null", O_RDWR);
    if (devnull >= 0) {
      dup2(devnull, 0);
      dup2(devnull, 1);
    }
    if (logfd >= 0)
      dup2(logfd, 2);
    execv(path, (char *const *)argv);
    dprintf(2, "cannot exec %s: %s\n", path, strerror(errno));
    _exit(127);
  }
  if (logfd >= 0)
    close(logfd);
  if (pid < 0) {
    unlink(logp);
    return probe_fail(j, "fork: %s", strerror(errno));
  }
  char err[512] = "";
  struct qmp *q = NULL;
  uint64_t deadline = now_ns() + (uint64_t)PROBE_TIMEOUT_MS * 1000000;
  int status = 0;
  bool exited = false;
  while (!q && now_ns() < deadline) {
    if (waitpid(pid, &status, WNOHANG) == pid) {
      exited = true;
      break;
    }
    q = qmp_connect(sock, 250, err, sizeof err);
  }
  if (!q) {
    char tail[400];
    if (!exited) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
    }
    vm_log_tail(logp, tail, sizeof tail);
    unlink(logp);
    unlink(sock);
    return probe_fail(j, "%s %s: %s", path, exited ? "exited at once" : "did not answer on QMP",
                      tail[0] ? tail : err);
  }
  json_object_set_new(j, "present", json_true());
  json_object_set_new(j, "version", json_string(qmp_version(q)));
  json_t *ret = NULL;
  json_t *machines = json_array(), *cpus = json_array();
  if (qmp_execute(q, "query-machines", NULL, &ret, err, sizeof err) == 0) {
    size_t i;
    json_t *m;
    json_array_foreach(ret, i, m) {
      const char *names[] = { json_string_value(json_object_get(m, "name")),
                              json_string_value(json_object_get(m, "alias")) };
      for (int n = 0; n < 2; n++)
        if (names[n] && !in_array(machines, names[n]))
          json_array_append_new(machines, json_string(names[n]));
    }
  } else {
    log_warn(NULL, "QEMU probe: query-machines: %s", err);
  }
  json_decref(ret);
  if (qmp_execute(q, "query-cpu-definitions", NULL, &ret, err, sizeof err) == 0) {
    size_t i;
    json_t *c;
    json_array_foreach(ret, i, c) {
      const char *name = json_string_value(json_object_get(c, "name"));
      if (name && !in_array(cpus, name))
        json_array_append_new(cpus, json_string(name));
    }
  } else {
    log_warn(NULL, "QEMU probe: query-cpu-definitions: %s", err);
  }
  json_decref(ret);
  json_object_set_new(j, "machines", sorted(machines));
  json_object_set_new(j, "cpu_models", sorted(cpus));
  qmp_execute(q, "quit", NULL, NULL, err, sizeof err);
  qmp_close(q);
  uint64_t until = now_ns() + 3000000000ull;
  while (waitpid(pid, &status, WNOHANG) != pid) {
    if (now_ns() > until) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      break;
    }
    usleep(10 * 1000);
  }
  unlink(logp);
  unlink(sock);
  return j;
}
