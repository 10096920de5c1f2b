/* vm_cmd: `ferry vm ...` (docs/cli.md): define, run, check and remove VMs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "common/util.h"

/* The qemu settings (its "config") and QEMU's own view of a qemu VM. */
static void print_qemu(const json_t *vm)
{
  const json_t *v = json_object_get(vm, "config");
  char b[32];
  uint64_t cpus = j_u64(v, "cpus");
  const char *cpu = j_str(v, "cpu_model");
  printf("  qemu:     %s, %llu CPU%s, machine %s, CPU model %s\n",
         fmt_bytes(j_u64(v, "memory"), b, sizeof b), (unsigned long long)cpus,
         cpus == 1 ? "" : "s", j_str(v, "machine"),
         cpu[0] && strcmp(cpu, "-") ? cpu : "(default: host with KVM, qemu64 with TCG)");
  size_t i;
  const json_t *n;
  json_array_foreach(json_object_get(v, "nics"), i, n)
    printf("  nic %zu:    network %s, %s, %s\n", i, j_str(n, "network"), j_str(n, "model"),
           j_str(n, "mac"));
  const char *kernel = j_str(v, "kernel");
  if (kernel[0] && strcmp(kernel, "-")) {
    printf("  boot:     kernel %s", kernel);
    if (j_str(v, "initrd")[0] && strcmp(j_str(v, "initrd"), "-"))
      printf(", initrd %s", j_str(v, "initrd"));
    if (j_str(v, "append")[0] && strcmp(j_str(v, "append"), "-"))
      printf(", append \"%s\"", j_str(v, "append"));
    printf("\n");
  } else {
    printf("  boot:     from its first disk\n");
  }
  const json_t *rt = json_object_get(vm, "runtime");
  if (json_is_object(rt))
    printf("  runtime:  %s (QEMU %s), accel %s, machine %s, cpu %s, QEMU %s\n",
           j_str(rt, "state"), j_str(rt, "qemu_status"), j_str(rt, "accel"),
           j_str(rt, "machine"), j_str(rt, "cpu_model"), j_str(rt, "qemu_version"));
}

static void print_vm(const json_t *v)
{
  const json_t *disks = json_object_get(v, "disks");
  bool qemu = strcmp(j_str(v, "driver"), "qemu") == 0;
  printf("vm %s: %s, driver %s", j_str(v, "name"), j_str(v, "state"), j_str(v, "driver"));
  if (j_u64(v, "pid"))
    printf(", pid %llu", (unsigned long long)j_u64(v, "pid"));
  printf("\n  disks:    ");
  size_t i;
  const json_t *d;
  json_array_foreach(disks, i, d) printf("%s%s", i ? ", " : "", json_string_value(d));
  printf("\n");
  if (qemu)
    print_qemu(v);
  else
    printf("  workload: %s\n", j_str(v, "workload")[0] && strcmp(j_str(v, "workload"), "-")
                                 ? j_str(v, "workload") : "(default)");
  const char *mig = json_string_value(json_object_get(v, "migration"));
  if (mig)
    printf("  migration: %s (in progress)\n", mig);
  const char *moved = json_string_value(json_object_get(v, "moved_to"));
  if (moved)
    printf("  moved to: site %s\n", moved);
  const json_t *rt = json_object_get(v, "runtime");
  if (json_is_object(rt) && !qemu) {
    const json_t *k = json_object_get(rt, "counters");
    char b1[32], b2[32];
    printf("  runtime:  %s, %.0f IOPS, writing %s, %llu writes (%s), %llu reads, "
           "%llu read errors, %llu write errors, %llu reconnects%s\n",
           j_str(rt, "state"), j_dbl(rt, "iops"), fmt_rate(j_dbl(rt, "write_bps"), b1, sizeof b1),
           (unsigned long long)j_u64(k, "writes"),
           fmt_bytes(j_u64(k, "bytes_written"), b2, sizeof b2),
           (unsigned long long)j_u64(k, "reads"), (unsigned long long)j_u64(k, "read_errors"),
           (unsigned long long)j_u64(k, "write_errors"), (unsigned long long)j_u64(k, "reconnects"),
           j_bool(k, "io_stalled") ? ", IO STALLED (disk unreachable)" : "");
  }
  const char *rerr = json_string_value(json_object_get(v, "runtime_error"));
  if (rerr)
    printf("  runtime:  no answer: %s\n", rerr);
}

static void print_vm_list(const json_t *answer)
{
  const json_t *vms = json_object_get(answer, "vms");
  static const char *const h[] = { "NAME", "DRIVER", "STATE", "DISKS", "PID", "NOTE" };
  struct table *t = table_new(6, h);
  size_t i;
  const json_t *v;
  json_array_foreach(vms, i, v) {
    char disks[512] = "", pid[24] = "-", note[128] = "";
    size_t k;
    const json_t *d;
    json_array_foreach(json_object_get(v, "disks"), k, d) {
      size_t l = strlen(disks);
      snprintf(disks + l, sizeof disks - l, "%s%s", k ? "," : "", json_string_value(d));
    }
    if (j_u64(v, "pid"))
      snprintf(pid, sizeof pid, "%llu", (unsigned long long)j_u64(v, "pid"));
    const char *mig = json_string_value(json_object_get(v, "migration"));
    const char *moved = json_string_value(json_object_get(v, "moved_to"));
    if (mig)
      snprintf(note, sizeof note, "migrating (%s)", mig);
    else if (moved)
      snprintf(note, sizeof note, "now at site %s", moved);
    const char *cells[] = { j_str(v, "name"), j_str(v, "driver"), j_str(v, "state"), disks, pid,
                            note };
    table_add(t, cells);
  }
  if (json_array_size(vms) == 0)
    printf("no VMs\n");
  else
    table_print(t, stdout, "");
  table_free(t);
}

static const char usage_create[] =
  "Usage: ferry vm create NAME --disk DISK [--disk DISK ...] [--driver sim]\n"
  "                       [--workload SPEC]\n"
  "       ferry vm create NAME --driver qemu --disk DISK [--disk DISK ...]\n"
  "                       [--memory SIZE] [--cpus N] [--machine TYPE]\n"
  "                       [--cpu-model MODEL] [--nic network=NET[,model=M][,mac=MAC]]...\n"
  "                       [--kernel PATH [--initrd PATH] [--append CMDLINE]]\n"
  "Defines a VM on this site's disks (each disk belongs to one VM).  It does not\n"
  "start it: 'ferry vm start NAME'.\n"
  "  --driver sim|qemu  the hypervisor driver [sim].  sim: a simulated VM whose\n"
  "                     every block is self-describing, so 'ferry vm verify' can\n"
  "                     check that no acknowledged write was lost or misplaced.\n"
  "                     qemu: a real QEMU guest on its disks over NBD\n"
  "                     (docs/qemu.md; 'ferry hypervisor show qemu')\n"
  "  --disk DISK        a disk of this site (up to 16, in order; qemu boots from\n"
  "                     the first unless --kernel)\n"
  "  --workload SPEC    sim only: comma-separated KEY=VALUE: write=70 (percent of\n"
  "                     IOs that write), bs=4k (IO size), iops=500 or rate=20M\n"
  "                     (pace; 0 = as fast as it goes), zipf=0.9 (hot-set skew,\n"
  "                     0 = uniform), qd=4 (IOs in flight), seed=N, disks=all or\n"
  "                     vda+vdb (the disks it does IO to)\n"
  "qemu only:\n"
  "  --memory SIZE      guest RAM, whole MiB from 16M to 16T [1G]\n"
  "  --cpus N           vCPUs, 1-255 [1]\n"
  "  --machine TYPE     QEMU machine type [q35]\n"
  "  --cpu-model MODEL  QEMU CPU model, e.g. qemu64, Skylake-Client,-hle [host with\n"
  "                     KVM, qemu64 without; 'host' needs KVM]\n"
  "  --nic network=NET[,model=M][,mac=MAC]\n"
  "                     a NIC on network NET ('ferry network add'; up to 8, in\n"
  "                     order); model a QEMU NIC device [virtio-net-pci]; mac\n"
  "                     unicast xx:xx:xx:xx:xx:xx [52:54:00 + a hash of the VM\n"
  "                     name and NIC index, stored at create]\n"
  "  --kernel PATH      boot this kernel directly (a file on ferryd's host;\n"
  "                     relative paths are taken from here)\n"
  "  --initrd PATH      its initramfs (needs --kernel)\n"
  "  --append CMDLINE   its command line (needs --kernel)\n";

/* --nic network=NET[,model=M][,mac=MAC] (or just NET) as a NIC object. */
static int nic_arg(const char *s, json_t **out)
{
  const char *cmd = "vm create";
  json_t *nic = json_object();
  char *copy = strdup(s), *save = NULL;
  int r = EXIT_OK;
  bool first = true;
  for (char *kv = strtok_r(copy, ",", &save); kv && r == EXIT_OK;
       kv = strtok_r(NULL, ",", &save), first = false) {
    char *eq = strchr(kv, '=');
    const char *key = eq ? kv : "network", *val = eq ? eq + 1 : kv;
    if (eq)
      *eq = '\0';
    if (!eq && !first) {
      r = cli_usage_error(cmd, "bad --nic '%s': expected network=NET[,model=M][,mac=MAC]", s);
    } else if (strcmp(key, "network") == 0) {
      if ((r = check_name(cmd, val)) == EXIT_OK)
        json_object_set_new(nic, "network", json_string(val));
    } else if (strcmp(key, "model") == 0) {
      bool ok = val[0] && strlen(val) < 32;
      for (const char *p = val; ok && *p; p++)
        ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
             strchr("._-", *p);
      if (!ok)
        r = cli_usage_error(cmd, "bad NIC model '%s': a QEMU NIC device such as "
                            "virtio-net-pci or e1000", val);
      else
        json_object_set_new(nic, "model", json_string(val));
    } else if (strcmp(key, "mac") == 0) {
      unsigned b[6];
      char tail;
      if (strlen(val) != 17 || sscanf(val, "%2x:%2x:%2x:%2x:%2x:%2x%c", &b[0], &b[1], &b[2],
                                      &b[3], &b[4], &b[5], &tail) != 6)
        r = cli_usage_error(cmd, "bad MAC address '%s': expected six hex bytes such as "
                            "52:54:00:12:34:56", val);
      else
        json_object_set_new(nic, "mac", json_string(val));
    } else {
      r = cli_usage_error(cmd, "bad --nic '%s': unknown key '%s' (network, model, mac)", s, key);
    }
  }
  free(copy);
  if (r == EXIT_OK && !json_object_get(nic, "network"))
    r = cli_usage_error(cmd, "bad --nic '%s': missing network=NET", s);
  if (r != EXIT_OK) {
    json_decref(nic);
    return r;
  }
  *out = nic;
  return EXIT_OK;
}

/* A path for ferryd: relative ones are taken from our working directory. */
static json_t *path_value(const char *p)
{
  if (p[0] == '/')
    return json_string(p);
  char cwd[4096];
  if (!getcwd(cwd, sizeof cwd))
    return json_string(p);
  char *full = NULL;
  if (asprintf(&full, "%s/%s", cwd, p) < 0)
    return json_string(p);
  json_t *j = json_string(full);
  free(full);
  return j;
}

static int vm_create_cmd(struct cli *c, int argc, char **argv)
{
  const char *driver = NULL, *workload = NULL, *disks[16], *pos[1], *memory = NULL,
             *cpus = NULL, *machine = NULL, *cpu_model = NULL, *nics[8], *kernel = NULL,
             *initrd = NULL, *append = NULL;
  unsigned ndisks = 0, nnics = 0;
  const struct opt_spec spec[] = {
    { "driver", true, &driver, NULL, NULL, NULL, 0 },
    { "workload", true, &workload, NULL, NULL, NULL, 0 },
    { "disk", true, NULL, NULL, disks, &ndisks, 16 },
    { "memory", true, &memory, NULL, NULL, NULL, 0 },
    { "cpus", true, &cpus, NULL, NULL, NULL, 0 },
    { "machine", true, &machine, NULL, NULL, NULL, 0 },
    { "cpu-model", true, &cpu_model, NULL, NULL, NULL, 0 },
    { "nic", true, NULL, NULL, nics, &nnics, 8 },
    { "kernel", true, &kernel, NULL, NULL, NULL, 0 },
    { "initrd", true, &initrd, NULL, NULL, NULL, 0 },
    { "append", true, &append, NULL, NULL, NULL, 0 },
  };
  const char *cmd = "vm create";
  int npos, r = parse_args(cmd, usage_create, argc, argv, spec, ARRAY_SIZE(spec), pos, 1, 1,
                           &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name(cmd, pos[0])))
    return r;
  if (ndisks == 0)
    return cli_usage_error(cmd, "missing --disk DISK");
  for (unsigned i = 0; i < ndisks; i++)
    if ((r = check_name(cmd, disks[i])))
      return r;
  if (driver && strcmp(driver, "sim") != 0 && strcmp(driver, "qemu") != 0)
    return cli_usage_error(cmd, "unknown driver '%s' (sim, qemu)", driver);
  bool qemu = driver && strcmp(driver, "qemu") == 0;
  const char *qemu_opt = memory ? "--memory" : cpus ? "--cpus" : machine ? "--machine"
                         : cpu_model ? "--cpu-model" : nnics ? "--nic" : kernel ? "--kernel"
                         : initrd ? "--initrd" : append ? "--append" : NULL;
  if (!qemu && qemu_opt)
    return cli_usage_error(cmd, "%s applies to --driver qemu only", qemu_opt);
  if (qemu && workload)
    return cli_usage_error(cmd, "--workload applies to --driver sim only (a qemu guest does its "
                           "own IO)");
  if ((initrd || append) && !kernel)
    return cli_usage_error(cmd, "%s needs --kernel (direct kernel boot)",
                           initrd ? "--initrd" : "--append");
  json_t *arr = json_array();
  for (unsigned i = 0; i < ndisks; i++)
    json_array_append_new(arr, json_string(disks[i]));
  json_t *body = json_pack("{s:s, s:s, s:o}", "name", pos[0], "driver", driver ? driver : "sim",
                           "disks", arr);
  if (workload)
    json_object_set_new(body, "workload", json_string(workload));
  if (memory) {
    uint64_t n;
    if ((r = size_arg(cmd, "--memory", memory, &n))) {
      json_decref(body);
      return r;
    }
    if (n < (16u << 20) || n % (1u << 20)) {
      json_decref(body);
      return cli_usage_error(cmd, "bad --memory '%s': whole MiB, at least 16M", memory);
    }
    json_object_set_new(body, "memory", json_integer((json_int_t)n));
  }
  if (cpus) {
    uint64_t n;
    if ((r = uint_arg(cmd, "--cpus", cpus, 255, &n)) || n == 0) {
      json_decref(body);
      return r ? r : cli_usage_error(cmd, "bad --cpus '%s': at least 1", cpus);
    }
    json_object_set_new(body, "cpus", json_integer((json_int_t)n));
  }
  if (machine)
    json_object_set_new(body, "machine", json_string(machine));
  if (cpu_model)
    json_object_set_new(body, "cpu_model", json_string(cpu_model));
  if (nnics) {
    json_t *na = json_array();
    for (unsigned i = 0; i < nnics; i++) {
      json_t *nic;
      if ((r = nic_arg(nics[i], &nic))) {
        json_decref(na);
        json_decref(body);
        return r;
      }
      json_array_append_new(na, nic);
    }
    json_object_set_new(body, "nics", na);
  }
  if (kernel)
    json_object_set_new(body, "kernel", path_value(kernel));
  if (initrd)
    json_object_set_new(body, "initrd", path_value(initrd));
  if (append)
    json_object_set_new(body, "append", json_string(append));
  r = call_and_show(c, "POST", "/v1/vms", body, print_vm);
  json_decref(body);
  return r;
}

static const char usage_list[] = "Usage: ferry vm list\nThe VMs of this site.\n";

static int vm_list_cmd(struct cli *c, int argc, char **argv)
{
  const char *pos[1];
  int npos, r = parse_args("vm list", usage_list, argc, argv, NULL, 0, pos, 0, 0, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  return call_and_show(c, "GET", "/v1/vms", NULL, print_vm_list);
}

/* show / start / stop / pause / resume: NAME, one request, the VM shown. */
static int vm_simple(struct cli *c, int argc, char **argv, const char *cmd, const char *usage,
                     const char *method, const char *action)
{
  const char *pos[1];
  int npos, r = parse_args(cmd, usage, argc, argv, NULL, 0, pos, 1, 1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name(cmd, pos[0])))
    return r;
  char path[160];
  snprintf(path, sizeof path, "/v1/vms/%s%s%s", pos[0], action ? "/" : "", action ? action : "");
  return call_and_show(c, method, path, NULL, print_vm);
}

static int vm_show(struct cli *c, int argc, char **argv)
{
  return vm_simple(c, argc, argv, "vm show",
                   "Usage: ferry vm show NAME\nOne VM: state, disks, workload and, while it runs, "
                   "what its process reports.\n", "GET", NULL);
}
static int vm_start(struct cli *c, int argc, char **argv)
{
  return vm_simple(c, argc, argv, "vm start",
                   "Usage: ferry vm start NAME\nStarts the VM's process (it keeps running when "
                   "ferryd stops).\n", "POST", "start");
}
static int vm_stop(struct cli *c, int argc, char **argv)
{
  return vm_simple(c, argc, argv, "vm stop",
                   "Usage: ferry vm stop NAME\nStops the VM.  sim: its IO is drained and its "
                   "state saved.  qemu: the guest is asked to power down (ACPI); if it has not\n"
                   "within ferryd's --qemu-stop-timeout, QEMU is told to quit, then killed.\n",
                   "POST", "stop");
}
static int vm_pause(struct cli *c, int argc, char **argv)
{
  return vm_simple(c, argc, argv, "vm pause",
                   "Usage: ferry vm pause NAME\nPauses the VM; returns once no IO of it is in "
                   "flight.\n", "POST", "pause");
}
static int vm_resume(struct cli *c, int argc, char **argv)
{
  return vm_simple(c, argc, argv, "vm resume", "Usage: ferry vm resume NAME\nResumes a paused "
                   "VM.\n", "POST", "resume");
}

static const char usage_verify[] =
  "Usage: ferry vm verify NAME\n"
  "Checks the VM's data: for `sim`, every block of every disk against the table\n"
  "of what the VM last wrote there (the VM pauses meanwhile when it runs).\n"
  "A qemu VM is refused (ferryd cannot check a real guest's data; use the guest's\n"
  "own check).\n"
  "Exit status 0 when every block is as written, 1 otherwise.\n";

static int vm_verify(struct cli *c, int argc, char **argv)
{
  const char *pos[1];
  int npos, r = parse_args("vm verify", usage_verify, argc, argv, NULL, 0, pos, 1, 1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("vm verify", pos[0])))
    return r;
  char path[160];
  snprintf(path, sizeof path, "/v1/vms/%s/verify", pos[0]);
  json_t *rep;
  if ((r = cli_call(c, "POST", path, NULL, &rep)))
    return r;
  bool ok = j_bool(rep, "ok");
  if (!c->json) {
    printf("vm %s: verify %s: %llu blocks, %llu written, %llu checked", pos[0],
           ok ? "OK" : "FAILED", (unsigned long long)j_u64(rep, "blocks"),
           (unsigned long long)j_u64(rep, "written_blocks"),
           (unsigned long long)j_u64(rep, "checked"));
    static const char *const kinds[] = { "lost", "newer", "misplaced", "foreign", "unexpected" };
    for (size_t i = 0; i < ARRAY_SIZE(kinds); i++)
      if (j_u64(rep, kinds[i]))
        printf(", %llu %s", (unsigned long long)j_u64(rep, kinds[i]), kinds[i]);
    printf("\n");
    const json_t *probs = json_object_get(rep, "problems");
    size_t i;
    const json_t *p;
    json_array_foreach(probs, i, p) {
      char *t = json_dumps(p, JSON_COMPACT);
      printf("  %s\n", t ? t : "?");
      free(t);
    }
  }
  json_decref(rep);
  return ok ? EXIT_OK : EXIT_REFUSED;
}

static const char usage_rm[] =
  "Usage: ferry vm rm NAME [--force]\n"
  "Removes a VM (its disks stay).  A running VM is refused unless --force, which\n"
  "stops it first.\n";

static int vm_rm(struct cli *c, int argc, char **argv)
{
  bool force = false;
  const char *pos[1];
  const struct opt_spec spec[] = { { "force", false, NULL, &force, NULL, NULL, 0 } };
  int npos, r = parse_args("vm rm", usage_rm, argc, argv, spec, ARRAY_SIZE(spec), pos, 1, 1,
                           &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("vm rm", pos[0])))
    return r;
  char path[160];
  snprintf(path, sizeof path, "/v1/vms/%s%s", pos[0], force ? "?force=true" : "");
  json_t *answer;
  r = cli_call(c, "DELETE", path, NULL, &answer);
  if (r == EXIT_OK && !c->json)
    printf("vm %s removed\n", pos[0]);
  json_decref(answer);
  return r;
}

static const char usage_workload[] =
  "Usage: ferry vm workload NAME SPEC\n"
  "Changes the workload of a VM (at once if it runs); SPEC as for 'vm create'.\n";

static int vm_workload(struct cli *c, int argc, char **argv)
{
  const char *pos[2];
  int npos, r = parse_args("vm workload", usage_workload, argc, argv, NULL, 0, pos, 2, 2, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("vm workload", pos[0])))
    return r;
  char path[160];
  snprintf(path, sizeof path, "/v1/vms/%s/workload", pos[0]);
  json_t *body = json_pack("{s:s}", "workload", pos[1]);
  r = call_and_show(c, "PUT", path, body, print_vm);
  json_decref(body);
  return r;
}

static const char usage_vm[] =
  "Usage: ferry vm SUBCOMMAND ...\n"
  "  create NAME --disk DISK [--driver sim] [--workload SPEC]\n"
  "  create NAME --driver qemu --disk DISK [--memory 1G] [--cpus N] [--nic ...] ...\n"
  "  list | show NAME\n"
  "  start | pause | resume | stop NAME\n"
  "  verify NAME               check every block against what the VM wrote\n"
  "  workload NAME SPEC        change the workload\n"
  "  rm NAME [--force]\n"
  "'ferry vm SUBCOMMAND --help' tells more.\n";

int cmd_vm(struct cli *c, int argc, char **argv)
{
  static const struct {
    const char *name;
    int (*fn)(struct cli *, int, char **);
  } subs[] = { { "create", vm_create_cmd }, { "list", vm_list_cmd }, { "ls", vm_list_cmd },
               { "show", vm_show }, { "start", vm_start }, { "stop", vm_stop },
               { "pause", vm_pause }, { "resume", vm_resume }, { "verify", vm_verify },
               { "rm", vm_rm }, { "workload", vm_workload } };
  if (argc < 2) {
    fprintf(stderr, "%s", usage_vm);
    return EXIT_USAGE;
  }
  if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
      strcmp(argv[1], "help") == 0) {
    printf("%s", usage_vm);
    return EXIT_OK;
  }
  for (size_t i = 0; i < ARRAY_SIZE(subs); i++)
    if (strcmp(argv[1], subs[i].name) == 0)
      return subs[i].fn(c, argc - 1, argv + 1);
  return cli_usage_error("vm", "unknown subcommand '%s'", argv[1]);
}
