/* spec: a VM's definition as JSON, both ways (see vm.h "specs").
 *
 * vm_spec_from_json is the one parser of VM definitions: the API's create
 * body and the spec a peer site sends for a migration both go through it, so
 * what one site accepts the other accepts too.  It checks only what the
 * spec says (syntax, ranges, which settings belong to which driver); what it
 * names on this site (disks, networks, boot files) is vm_create's to check.
 *
 * Every string that ends up on QEMU's command line is held to a character
 * set that cannot break out of its option: names, machine types and NIC
 * models have no commas (QEMU splits options at commas), a CPU model may
 * have them (its own option: "Skylake-Client,-hle"), paths and the kernel
 * command line no control characters. */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <xxhash.h>

#include "common/util.h"
#include "vm/vm.h"

#define MiB (1024ull * 1024)
#define GiB (1024 * MiB)
#define QEMU_MIN_MEMORY (16 * MiB)
#define QEMU_MAX_MEMORY (16ull * 1024 * GiB)
#define QEMU_MAX_CPUS 255
#define DEFAULT_NIC_MODEL "virtio-net-pci"

static int bad(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int bad(char *err, size_t errlen, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
  return -EINVAL;
}

void vm_nic_mac(const char *vm_name, unsigned index, char out[18])
{
  char key[96];
  int n = snprintf(key, sizeof key, "%s/%u", vm_name, index);
  uint64_t h = XXH64(key, (size_t)MAX(n, 0), 0x66657272790aull);
  snprintf(out, 18, "52:54:00:%02x:%02x:%02x", (unsigned)(h >> 16) & 0xff,
           (unsigned)(h >> 8) & 0xff, (unsigned)h & 0xff);
}

void vm_spec_fill_defaults(struct vm_spec *s)
{
  if (strcmp(s->driver, "qemu") != 0)
    return;
  if (!s->memory_bytes)
    s->memory_bytes = GiB;
  if (!s->cpus)
    s->cpus = 1;
  if (!s->machine[0])
    snprintf(s->machine, sizeof s->machine, "q35");
  for (unsigned i = 0; i < s->nnics && i < VM_MAX_NICS; i++) {
    if (!s->nics[i].model[0])
      snprintf(s->nics[i].model, sizeof s->nics[i].model, DEFAULT_NIC_MODEL);
    if (!s->nics[i].mac[0])
      vm_nic_mac(s->name, i, s->nics[i].mac);
  }
}

json_t *vm_spec_to_json(const struct vm_spec *s)
{
  json_t *disks = json_array();
  for (unsigned i = 0; i < s->ndisks; i++)
    json_array_append_new(disks, json_string(s->disks[i]));
  json_t *j = json_pack("{s:s, s:s, s:o, s:s}", "name", s->name, "driver", s->driver, "disks",
                        disks, "workload", s->workload);
  if (strcmp(s->driver, "qemu") != 0)
    return j;
  json_t *nics = json_array();
  for (unsigned i = 0; i < s->nnics; i++)
    json_array_append_new(nics, json_pack("{s:s, s:s, s:s}", "network", s->nics[i].network,
                                          "model", s->nics[i].model, "mac", s->nics[i].mac));
  json_object_set_new(j, "memory", json_integer((json_int_t)s->memory_bytes));
  json_object_set_new(j, "cpus", json_integer(s->cpus));
  json_object_set_new(j, "machine", json_string(s->machine));
  json_object_set_new(j, "cpu_model", json_string(s->cpu_model));
  json_object_set_new(j, "nics", nics);
  json_object_set_new(j, "kernel", json_string(s->kernel));
  json_object_set_new(j, "initrd", json_string(s->initrd));
  json_object_set_new(j, "append", json_string(s->append));
  return j;
}

/* ---- checks ---- */

/* 1..max characters, each alphanumeric or in extra; the first alphanumeric. */
static bool token_ok(const char *s, size_t max, const char *extra)
{
  size_t n = strlen(s);
  if (n == 0 || n > max || !isalnum((unsigned char)s[0]))
    return false;
  for (size_t i = 0; i < n; i++)
    if (!isalnum((unsigned char)s[i]) && !strchr(extra, s[i]))
      return false;
  return true;
}

static bool printable(const char *s)
{
  for (; *s; s++)
    if ((unsigned char)*s < 0x20 || *s == 0x7f)
      return false;
  return true;
}

/* "52:54:00:ab:cd:ef", case-insensitive; written back in lower case. */
static int mac_parse(const char *s, char out[18], char *err, size_t errlen)
{
  unsigned b[6];
  char tail;
  if (strlen(s) != 17 || sscanf(s, "%2x:%2x:%2x:%2x:%2x:%2x%c", &b[0], &b[1], &b[2], &b[3],
                                &b[4], &b[5], &tail) != 6)
    return bad(err, errlen, "bad MAC address '%.40s': expected six hex bytes such as "
               "52:54:00:12:34:56", s);
  for (int i = 0; i < 17; i++)
    if ((i % 3 == 2) != (s[i] == ':') || (i % 3 != 2 && !isxdigit((unsigned char)s[i])))
      return bad(err, errlen, "bad MAC address '%.40s': expected six hex bytes such as "
                 "52:54:00:12:34:56", s);
  if (b[0] & 1)
    return bad(err, errlen, "MAC address '%s' is a multicast address: a NIC needs a unicast "
               "one (first byte even)", s);
  if (!(b[0] | b[1] | b[2] | b[3] | b[4] | b[5]))
    return bad(err, errlen, "MAC address '%s' is all zeros", s);
  snprintf(out, 18, "%02x:%02x:%02x:%02x:%02x:%02x", b[0] & 0xff, b[1] & 0xff, b[2] & 0xff,
           b[3] & 0xff, b[4] & 0xff, b[5] & 0xff);
  return 0;
}

static int str_member(const json_t *j, const char *key, char *out, size_t outlen, bool *given,
                      char *err, size_t errlen)
{
  json_t *v = json_object_get(j, key);
  *given = v != NULL;
  if (!v)
    return 0;
  if (!json_is_string(v))
    return bad(err, errlen, "'%s' must be a string", key);
  const char *s = json_string_value(v);
  if (strlen(s) >= outlen)
    return bad(err, errlen, "'%s' is longer than %zu characters", key, outlen - 1);
  snprintf(out, outlen, "%s", s);
  return 0;
}

static int path_member(const json_t *j, const char *key, char *out, bool *given, char *err,
                       size_t errlen)
{
  int r = str_member(j, key, out, VM_PATH_LEN, given, err, errlen);
  if (r < 0 || !out[0])
    return r;
  if (out[0] != '/')
    return bad(err, errlen, "'%s' must be an absolute path (on ferryd's host), not '%.200s'",
               key, out);
  if (!printable(out))
    return bad(err, errlen, "'%s' has control characters", key);
  return 0;
}

static int parse_nics(const json_t *arr, struct vm_spec *s, char *err, size_t errlen)
{
  if (!json_is_array(arr))
    return bad(err, errlen, "'nics' must be an array of {\"network\", \"model\", \"mac\"}");
  if (json_array_size(arr) > VM_MAX_NICS)
    return bad(err, errlen, "a VM has at most %d NICs, not %zu", VM_MAX_NICS,
               json_array_size(arr));
  size_t i;
  json_t *n;
  json_array_foreach(arr, i, n) {
    struct vm_nic *nic = &s->nics[s->nnics];
    memset(nic, 0, sizeof *nic);
    if (!json_is_object(n))
      return bad(err, errlen, "NIC %zu must be an object {\"network\", \"model\", \"mac\"}", i);
    const char *key;
    json_t *v;
    json_object_foreach(n, key, v) {
      if (strcmp(key, "network") != 0 && strcmp(key, "model") != 0 && strcmp(key, "mac") != 0)
        return bad(err, errlen, "NIC %zu: unknown member '%.64s' (network, model, mac)", i, key);
    }
    bool given;
    char mac[64] = "";
    int r;
    if ((r = str_member(n, "network", nic->network, sizeof nic->network, &given, err,
                        errlen)) < 0)
      return r;
    if (!given)
      return bad(err, errlen, "NIC %zu: missing 'network'", i);
    if (!name_is_valid(nic->network))
      return bad(err, errlen, "NIC %zu: invalid network name '%.80s'", i, nic->network);
    if ((r = str_member(n, "model", nic->model, sizeof nic->model, &given, err, errlen)) < 0)
      return r;
    if (nic->model[0] && !token_ok(nic->model, sizeof nic->model - 1, "._-"))
      return bad(err, errlen, "NIC %zu: bad model '%.40s': a QEMU NIC device name such as "
                 "virtio-net-pci, e1000 (letters, digits, . _ -)", i, nic->model);
    if ((r = str_member(n, "mac", mac, sizeof mac, &given, err, errlen)) < 0)
      return r;
    if (mac[0] && mac_parse(mac, nic->mac, err, errlen) < 0)
      return -EINVAL;
    for (unsigned k = 0; k < s->nnics; k++)
      if (nic->mac[0] && strcmp(s->nics[k].mac, nic->mac) == 0)
        return bad(err, errlen, "NICs %u and %zu have the same MAC %s", k, i, nic->mac);
    s->nnics++;
  }
  return 0;
}

int vm_spec_from_json(const json_t *j, struct vm_spec *out, char *err, size_t errlen)
{
  static const char *const known[] = { "name", "driver", "disks", "workload", "memory", "cpus",
                                       "machine", "cpu_model", "nics", "kernel", "initrd",
                                       "append", NULL };
  static const char *const qemu_only[] = { "memory", "cpus", "machine", "cpu_model", "nics",
                                           "kernel", "initrd", "append", NULL };
  struct vm_spec s;
  memset(&s, 0, sizeof s);
  memset(out, 0, sizeof *out);
  if (!json_is_object(j))
    return bad(err, errlen, "a VM must be a JSON object");
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)j, key, v) {
    bool ok = false;
    for (const char *const *k = known; *k; k++)
      ok = ok || strcmp(*k, key) == 0;
    if (!ok)
      return bad(err, errlen, "unknown field '%.64s'", key);
  }
  bool given;
  int r;
  if ((r = str_member(j, "name", s.name, sizeof s.name, &given, err, errlen)) < 0)
    return r;
  if (!given)
    return bad(err, errlen, "missing field 'name'");
  if (!name_is_valid(s.name))
    return bad(err, errlen, "invalid name '%.80s': 1-64 characters of A-Z a-z 0-9 . _ -, not "
               "starting with '.' or '-'", s.name);
  if ((r = str_member(j, "driver", s.driver, sizeof s.driver, &given, err, errlen)) < 0)
    return r;
  if (!given)
    snprintf(s.driver, sizeof s.driver, "sim");
  bool qemu = strcmp(s.driver, "qemu") == 0;
  if (!qemu && strcmp(s.driver, "sim") != 0)
    return bad(err, errlen, "unknown driver '%.40s' (sim, qemu)", s.driver);

  json_t *disks = json_object_get(j, "disks");
  if (!json_is_array(disks) || json_array_size(disks) == 0 ||
      json_array_size(disks) > VM_MAX_DISKS)
    return bad(err, errlen, "'disks' must be an array of 1 to %d disk names", VM_MAX_DISKS);
  size_t i;
  json_t *x;
  json_array_foreach(disks, i, x) {
    const char *d = json_string_value(x);
    if (!d)
      return bad(err, errlen, "'disks' must hold disk names");
    if (!name_is_valid(d))
      return bad(err, errlen, "invalid disk name '%.80s'", d);
    for (unsigned k = 0; k < s.ndisks; k++)
      if (strcmp(s.disks[k], d) == 0)
        return bad(err, errlen, "disk '%s' is given twice", d);
    snprintf(s.disks[s.ndisks++], sizeof s.disks[0], "%s", d);
  }
  if ((r = str_member(j, "workload", s.workload, sizeof s.workload, &given, err, errlen)) < 0)
    return r;
  if (qemu && s.workload[0])
    return bad(err, errlen, "'workload' applies to sim VMs only (a qemu guest does its own IO)");

  if (!qemu) {
    for (const char *const *k = qemu_only; *k; k++)
      if (json_object_get(j, *k))
        return bad(err, errlen, "'%s' applies to qemu VMs only", *k);
    *out = s;
    return 0;
  }

  /* ---- qemu settings ---- */
  json_t *mem = json_object_get(j, "memory");
  if (mem) {
    uint64_t n = 0;
    if (json_is_integer(mem) && json_integer_value(mem) > 0) {
      n = (uint64_t)json_integer_value(mem);
    } else if (!json_is_string(mem) || parse_size(json_string_value(mem), &n) < 0) {
      return bad(err, errlen, "'memory' must be a number of bytes or a size such as \"1G\", "
                 "\"512M\"");
    }
    if (n < QEMU_MIN_MEMORY || n > QEMU_MAX_MEMORY || n % MiB)
      return bad(err, errlen, "'memory' must be a whole number of MiB from 16M to 16T, not "
                 "%llu bytes", (unsigned long long)n);
    s.memory_bytes = n;
  }
  json_t *cpus = json_object_get(j, "cpus");
  if (cpus) {
    if (!json_is_integer(cpus) || json_integer_value(cpus) < 1 ||
        json_integer_value(cpus) > QEMU_MAX_CPUS)
      return bad(err, errlen, "'cpus' must be a number from 1 to %d", QEMU_MAX_CPUS);
    s.cpus = (unsigned)json_integer_value(cpus);
  }
  if ((r = str_member(j, "machine", s.machine, sizeof s.machine, &given, err, errlen)) < 0)
    return r;
  if (s.machine[0] && !token_ok(s.machine, sizeof s.machine - 1, "._-"))
    return bad(err, errlen, "bad machine type '%.40s': a QEMU machine such as q35, pc, "
               "pc-q35-7.2 (letters, digits, . _ -)", s.machine);
  if ((r = str_member(j, "cpu_model", s.cpu_model, sizeof s.cpu_model, &given, err,
                      errlen)) < 0)
    return r;
  if (s.cpu_model[0] && !token_ok(s.cpu_model, sizeof s.cpu_model - 1, "._-,+="))
    return bad(err, errlen, "bad CPU model '%.70s': a QEMU CPU model such as host, qemu64, "
               "Skylake-Client, with optional ,+feature / ,-feature", s.cpu_model);
  json_t *nics = json_object_get(j, "nics");
  if (nics && (r = parse_nics(nics, &s, err, errlen)) < 0)
    return r;
  bool kgiven, igiven, agiven;
  if ((r = path_member(j, "kernel", s.kernel, &kgiven, err, errlen)) < 0 ||
      (r = path_member(j, "initrd", s.initrd, &igiven, err, errlen)) < 0 ||
      (r = str_member(j, "append", s.append, sizeof s.append, &agiven, err, errlen)) < 0)
    return r;
  if (!printable(s.append))
    return bad(err, errlen, "'append' has control characters");
  if (!s.kernel[0] && (s.initrd[0] || s.append[0]))
    return bad(err, errlen, "'%s' needs 'kernel' (direct kernel boot)",
               s.initrd[0] ? "initrd" : "append");
  vm_spec_fill_defaults(&s);
  /* The defaults gave NICs without a MAC theirs; a given one may collide. */
  for (unsigned a = 0; a < s.nnics; a++)
    for (unsigned b = 0; b < a; b++)
      if (strcmp(s.nics[a].mac, s.nics[b].mac) == 0)
        return bad(err, errlen, "NICs %u and %u have the same MAC %s", b, a, s.nics[a].mac);
  *out = s;
  return 0;
}
