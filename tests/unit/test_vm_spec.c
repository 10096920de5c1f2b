/* test_vm_spec: the one parser of VM definitions (src/vm/spec.c), which
 * reads both the API's create bodies and the specs peer sites send: what it
 * accepts must survive a round trip unchanged, defaults must be filled the
 * same way at both sites (MACs included), and every bad value must be
 * refused with a message that names it. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vm/vm.h"

#include "check.h"

static int parse(const char *text, struct vm_spec *s, char *err, size_t errlen)
{
  json_error_t je;
  json_t *j = json_loads(text, 0, &je);
  if (!j) {
    fprintf(stderr, "bad test JSON %s: %s\n", text, je.text);
    exit(1);
  }
  int r = vm_spec_from_json(j, s, err, errlen);
  json_decref(j);
  return r;
}

static void bad(const char *text, const char *want)
{
  struct vm_spec s;
  char err[512] = "";
  int r = parse(text, &s, err, sizeof err);
  if (r != -EINVAL || !strstr(err, want)) {
    fprintf(stderr, "spec %s: got %d '%s', want -EINVAL with '%s'\n", text, r, err, want);
    failures++;
  }
}

static void test_sim(void)
{
  struct vm_spec s;
  char err[512];
  CHECK(parse("{\"name\":\"vm1\",\"disks\":[\"vda\",\"vdb\"],\"workload\":\"write=70\"}", &s, err,
              sizeof err) == 0);
  CHECK(strcmp(s.driver, "sim") == 0 && s.ndisks == 2 && strcmp(s.disks[1], "vdb") == 0);
  CHECK(strcmp(s.workload, "write=70") == 0);
  CHECK(s.memory_bytes == 0 && s.cpus == 0 && s.nnics == 0 && !s.machine[0]);
  /* The migration engine's older shape: the same members, workload "". */
  CHECK(parse("{\"name\":\"vm1\",\"driver\":\"sim\",\"workload\":\"\",\"disks\":[\"vda\"]}", &s,
              err, sizeof err) == 0);
  json_t *j = vm_spec_to_json(&s);
  CHECK(json_object_size(j) == 4);           /* no qemu members for sim */
  json_decref(j);
  bad("{\"name\":\"vm1\",\"disks\":[\"vda\"],\"memory\":\"1G\"}", "qemu VMs only");
  bad("{\"name\":\"vm1\",\"disks\":[\"vda\"],\"nics\":[]}", "qemu VMs only");
}

static void test_qemu_defaults_and_round_trip(void)
{
  struct vm_spec s, t;
  char err[512];
  CHECK(parse("{\"name\":\"g1\",\"driver\":\"qemu\",\"disks\":[\"vda\"],"
              "\"nics\":[{\"network\":\"lan\"},{\"network\":\"lan\",\"model\":\"e1000\","
              "\"mac\":\"02:AB:cd:00:00:01\"}]}", &s, err, sizeof err) == 0);
  CHECK(s.memory_bytes == 1ull << 30 && s.cpus == 1 && strcmp(s.machine, "q35") == 0);
  CHECK(s.cpu_model[0] == '\0');            /* as asked: the default depends on KVM */
  CHECK(s.nnics == 2 && strcmp(s.nics[0].model, "virtio-net-pci") == 0);
  CHECK(strncmp(s.nics[0].mac, "52:54:00:", 9) == 0 && strlen(s.nics[0].mac) == 17);
  CHECK(strcmp(s.nics[1].mac, "02:ab:cd:00:00:01") == 0);     /* normalised */
  char mac[18];
  vm_nic_mac("g1", 0, mac);
  CHECK(strcmp(mac, s.nics[0].mac) == 0);   /* stable: the same at every site */
  vm_nic_mac("g1", 1, mac);
  char mac2[18];
  vm_nic_mac("g2", 0, mac2);
  CHECK(strcmp(mac, s.nics[0].mac) != 0 && strcmp(mac2, s.nics[0].mac) != 0);

  json_t *j = vm_spec_to_json(&s);
  CHECK(vm_spec_from_json(j, &t, err, sizeof err) == 0);
  json_t *k = vm_spec_to_json(&t);
  CHECK(json_equal(j, k));
  json_decref(j);
  json_decref(k);

  CHECK(parse("{\"name\":\"g2\",\"driver\":\"qemu\",\"disks\":[\"vda\"],\"memory\":\"512M\","
              "\"cpus\":4,\"machine\":\"pc-q35-7.2\",\"cpu_model\":\"Skylake-Client,-hle\","
              "\"kernel\":\"/boot/vmlinuz\",\"initrd\":\"/boot/initrd.img\","
              "\"append\":\"console=ttyS0 root=/dev/vda1\"}", &s, err, sizeof err) == 0);
  CHECK(s.memory_bytes == 512ull << 20 && s.cpus == 4);
  CHECK(strcmp(s.cpu_model, "Skylake-Client,-hle") == 0);
  CHECK(strcmp(s.append, "console=ttyS0 root=/dev/vda1") == 0);
  /* "" is the default, as if absent. */
  CHECK(parse("{\"name\":\"g5\",\"driver\":\"qemu\",\"disks\":[\"vda\"],\"machine\":\"\","
              "\"cpu_model\":\"\"}", &s, err, sizeof err) == 0 && strcmp(s.machine, "q35") == 0);
  CHECK(parse("{\"name\":\"g3\",\"driver\":\"qemu\",\"disks\":[\"vda\"],\"memory\":268435456}",
              &s, err, sizeof err) == 0 && s.memory_bytes == 256ull << 20);

  /* fill_defaults on a spec built in C (as the migration engine does). */
  struct vm_spec c;
  memset(&c, 0, sizeof c);
  snprintf(c.name, sizeof c.name, "g4");
  snprintf(c.driver, sizeof c.driver, "qemu");
  c.ndisks = 1;
  snprintf(c.disks[0], sizeof c.disks[0], "vda");
  c.nnics = 1;
  snprintf(c.nics[0].network, sizeof c.nics[0].network, "lan");
  vm_spec_fill_defaults(&c);
  vm_nic_mac("g4", 0, mac);
  CHECK(c.memory_bytes == 1ull << 30 && strcmp(c.nics[0].mac, mac) == 0);
}

static void test_refusals(void)
{
  bad("[1]", "JSON object");
  bad("{\"disks\":[\"vda\"]}", "missing field 'name'");
  bad("{\"name\":\"-x\",\"disks\":[\"vda\"]}", "invalid name");
  bad("{\"name\":\"x\",\"disks\":[\"vda\"],\"color\":1}", "unknown field 'color'");
  bad("{\"name\":\"x\",\"driver\":\"xen\",\"disks\":[\"vda\"]}", "unknown driver");
  bad("{\"name\":\"x\",\"disks\":[]}", "1 to 16");
  bad("{\"name\":\"x\",\"disks\":\"vda\"}", "1 to 16");
  bad("{\"name\":\"x\",\"disks\":[\"vda\",\"vda\"]}", "given twice");
  bad("{\"name\":\"x\",\"disks\":[\"../etc\"]}", "invalid disk name");
#define Q "{\"name\":\"x\",\"driver\":\"qemu\",\"disks\":[\"vda\"],"
  bad(Q "\"workload\":\"write=50\"}", "sim VMs only");
  bad(Q "\"memory\":\"lots\"}", "'memory'");
  bad(Q "\"memory\":\"8M\"}", "16M to 16T");
  bad(Q "\"memory\":1000000000}", "whole number of MiB");
  bad(Q "\"memory\":-1}", "'memory'");
  bad(Q "\"cpus\":0}", "1 to 255");
  bad(Q "\"cpus\":256}", "1 to 255");
  bad(Q "\"cpus\":\"2\"}", "1 to 255");
  bad(Q "\"machine\":\"q35,accel=kvm\"}", "bad machine type");
  bad(Q "\"cpu_model\":\"host -smp 4\"}", "bad CPU model");
  bad(Q "\"nics\":{}}", "array");
  bad(Q "\"nics\":[{}]}", "missing 'network'");
  bad(Q "\"nics\":[{\"network\":\"lan\",\"speed\":1}]}", "unknown member 'speed'");
  bad(Q "\"nics\":[{\"network\":\"l a n\"}]}", "invalid network name");
  bad(Q "\"nics\":[{\"network\":\"lan\",\"model\":\"e1000,addr=5\"}]}", "bad model");
  bad(Q "\"nics\":[{\"network\":\"lan\",\"mac\":\"52:54:00:12:34\"}]}", "bad MAC");
  bad(Q "\"nics\":[{\"network\":\"lan\",\"mac\":\"52:54:00:12:34:zz\"}]}", "bad MAC");
  bad(Q "\"nics\":[{\"network\":\"lan\",\"mac\":\"01:00:5e:00:00:01\"}]}", "multicast");
  bad(Q "\"nics\":[{\"network\":\"lan\",\"mac\":\"00:00:00:00:00:00\"}]}", "all zeros");
  bad(Q "\"nics\":[{\"network\":\"a\",\"mac\":\"02:00:00:00:00:01\"},"
        "{\"network\":\"b\",\"mac\":\"02:00:00:00:00:01\"}]}", "same MAC");
  bad(Q "\"nics\":[{\"network\":\"a\"},{\"network\":\"a\"},{\"network\":\"a\"},"
        "{\"network\":\"a\"},{\"network\":\"a\"},{\"network\":\"a\"},{\"network\":\"a\"},"
        "{\"network\":\"a\"},{\"network\":\"a\"}]}", "at most 8");
  bad(Q "\"kernel\":\"vmlinuz\"}", "absolute path");
  bad(Q "\"kernel\":\"/boot/vm\\nlinuz\"}", "control characters");
  bad(Q "\"initrd\":\"/boot/initrd\"}", "needs 'kernel'");
  bad(Q "\"append\":\"quiet\"}", "needs 'kernel'");
  bad(Q "\"kernel\":\"/k\",\"append\":\"a\\u0001b\"}", "control characters");
  bad(Q "\"kernel\":5}", "must be a string");
#undef Q
}

int main(void)
{
  test_sim();
  test_qemu_defaults_and_round_trip();
  test_refusals();
  if (failures)
    fprintf(stderr, "%d check(s) failed\n", failures);
  return failures ? 1 : 0;
}
