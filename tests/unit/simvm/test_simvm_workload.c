/* test_simvm_workload: workload specs (src/vm/simvm/workload.c): defaults,
 * each key at its bounds, the canonical form and its round trip, and a list
 * of bad specs that must each be refused with a message naming the problem
 * and without touching the output. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "vm/simvm/workload.h"

#include "check.h"

static bool parses(const char *spec, struct workload *w)
{
  char err[256] = "";
  int rc = workload_parse(spec, w, err, sizeof err);
  if (rc != 0)
    fprintf(stderr, "'%s' refused: %s\n", spec, err);
  return rc == 0;
}

static void canonical(const char *spec, const char *want)
{
  struct workload w;
  char buf[SIM_WL_SPEC_MAX];
  if (!parses(spec, &w)) {
    failures++;
    return;
  }
  workload_format(&w, buf, sizeof buf);
  if (strcmp(buf, want) != 0) {
    fprintf(stderr, "'%s' formats as '%s', want '%s'\n", spec, buf, want);
    failures++;
  }
  /* The canonical form parses back to the same workload. */
  struct workload w2;
  char buf2[SIM_WL_SPEC_MAX];
  CHECK(parses(buf, &w2));
  workload_format(&w2, buf2, sizeof buf2);
  CHECK(strcmp(buf, buf2) == 0);
  CHECK(w2.write_pct == w.write_pct && w2.bs == w.bs && w2.iops == w.iops && w2.rate == w.rate &&
        w2.zipf == w.zipf && w2.qd == w.qd && w2.has_seed == w.has_seed && w2.seed == w.seed &&
        w2.all_disks == w.all_disks && w2.ndisks == w.ndisks);
}

static void refused(const char *spec, const char *want)
{
  struct workload w;
  memset(&w, 0xa5, sizeof w);
  struct workload before = w;
  char err[256] = "";
  if (workload_parse(spec, &w, err, sizeof err) == 0) {
    fprintf(stderr, "'%s' accepted, should be refused\n", spec);
    failures++;
    return;
  }
  if (memcmp(&w, &before, sizeof w) != 0) {
    fprintf(stderr, "'%s' refused but changed the output\n", spec);
    failures++;
  }
  if (!strstr(err, "workload") || (want && !strstr(err, want))) {
    fprintf(stderr, "'%s': message '%s' lacks '%s'\n", spec, err, want ? want : "workload");
    failures++;
  }
}

int main(void)
{
  struct workload w;
  workload_default(&w);
  CHECK(w.write_pct == 70 && w.bs == 4096 && w.iops == 500 && w.zipf == 0.9 && w.qd == 4 &&
        w.all_disks && !w.has_seed && !w.rate_set);
  canonical("", "write=70,bs=4k,iops=500,zipf=0.9,qd=4,disks=all");
  canonical("write=100,bs=1M,iops=0,zipf=0,qd=64",
            "write=100,bs=1M,iops=0,zipf=0,qd=64,disks=all");
  canonical("qd=16,write=0", "write=0,bs=4k,iops=500,zipf=0.9,qd=16,disks=all");
  canonical("bs=64KiB,rate=20M", "write=70,bs=64k,rate=20M,zipf=0.9,qd=4,disks=all");
  canonical("rate=20M/s", "write=70,bs=4k,rate=20M,zipf=0.9,qd=4,disks=all");
  canonical("rate=1000", "write=70,bs=4k,rate=1000,zipf=0.9,qd=4,disks=all");
  canonical("rate=0", "write=70,bs=4k,rate=0,zipf=0.9,qd=4,disks=all");
  canonical("zipf=1.25,seed=18446744073709551615,disks=vda+data.2",
            "write=70,bs=4k,iops=500,zipf=1.25,qd=4,seed=18446744073709551615,disks=vda+data.2");
  canonical("zipf=10,qd=128,bs=512k", "write=70,bs=512k,iops=500,zipf=10,qd=128,disks=all");
  canonical("iops=10000000", "write=70,bs=4k,iops=10000000,zipf=0.9,qd=4,disks=all");

  CHECK(parses("rate=40M,bs=1M", &w));
  CHECK(fabs(workload_target_iops(&w) - 40.0) < 1e-9);
  CHECK(parses("iops=0", &w) && workload_target_iops(&w) == 0);
  CHECK(parses("rate=0", &w) && workload_target_iops(&w) == 0);
  CHECK(parses("iops=250", &w) && workload_target_iops(&w) == 250);
  CHECK(parses("disks=b+a", &w) && workload_uses_disk(&w, "a") && workload_uses_disk(&w, "b") &&
        !workload_uses_disk(&w, "c"));
  CHECK(parses("seed=0", &w) && w.has_seed && w.seed == 0);

  refused("write=101", "write");
  refused("write=-1", "write");
  refused("write=50%", "write");
  refused("write=", "key=value");
  refused("bs=6k", "bs");
  refused("bs=2M", "bs");
  refused("bs=0", "bs");
  refused("bs=4097", "bs");
  refused("bs=lots", "bs");
  refused("iops=1.5", "iops");
  refused("iops=10000001", "iops");
  refused("iops=0x10", "iops");
  refused("rate=fast", "rate");
  refused("rate=-5M", "rate");
  refused("iops=100,rate=1M", "alternatives");
  refused("zipf=-0.5", "zipf");
  refused("zipf=11", "zipf");
  refused("zipf=inf", "zipf");
  refused("zipf=nan", "zipf");
  refused("zipf=1e3", "zipf");
  refused("qd=0", "qd");
  refused("qd=129", "qd");
  refused("qd=128,bs=1M", "in flight");
  refused("seed=-1", "seed");
  refused("seed=18446744073709551616", "seed");
  refused("disks=", "key=value");
  refused("disks=a++b", "disks");
  refused("disks=a+a", "twice");
  refused("disks=../x", "valid disk name");
  refused("disks=a+", "disks");
  refused("foo=1", "unknown key");
  refused("write=50,write=60", "twice");
  refused("write=50,", "trailing comma");
  refused(",write=50", "empty item");
  refused("write=50,,qd=2", "empty item");
  refused("write = 50", "spaces");
  refused("write=50 ", "spaces");
  refused("write", "key=value");
  refused("=50", "key=value");
  char longspec[SIM_WL_SPEC_MAX + 10];
  memset(longspec, 'a', sizeof longspec - 1);
  longspec[sizeof longspec - 1] = '\0';
  refused(longspec, "longer");
  struct workload x;
  char err[64];
  CHECK(workload_parse(NULL, &x, err, sizeof err) < 0);

  if (failures) {
    fprintf(stderr, "test_simvm_workload: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_simvm_workload: ok\n");
  return 0;
}
