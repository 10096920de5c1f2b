/* test_link_identity: checks src/link/identity.c in temp directories: a new
 * identity and what it is made of (P-256 key, v3 self-signed certificate,
 * CN, modes), reloading it (same fingerprint), refusing half an identity or
 * a damaged one, and fingerprints of PEM text compared with a SHA-256 of the
 * DER computed here independently. */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "link/link.h"

#include "check.h"
#include "link_test.h"

static char *path_in(const char *dir, const char *name)
{
  char *p;
  if (asprintf(&p, "%s/%s", dir, name) < 0)
    exit(1);
  return p;
}

static void write_file(const char *path, const char *text)
{
  FILE *f = fopen(path, "w");
  CHECK(f != NULL);
  if (f) {
    fputs(text, f);
    fclose(f);
  }
}

static char *read_file(const char *path)
{
  FILE *f = fopen(path, "r");
  if (!f)
    return NULL;
  char *buf = calloc(1, 65536);
  size_t n = fread(buf, 1, 65535, f);
  buf[n] = '\0';
  fclose(f);
  return buf;
}

/* sha256:<hex> of the DER inside a PEM certificate, without link code. */
static void fingerprint_here(const char *pem, char out[LINK_FINGERPRINT_LEN])
{
  BIO *b = BIO_new_mem_buf(pem, -1);
  char *name = NULL, *header = NULL;
  unsigned char *der = NULL;
  long len = 0;
  out[0] = '\0';
  if (b && PEM_read_bio(b, &name, &header, &der, &len)) {
    unsigned char md[32];
    unsigned int mdlen = 0;
    EVP_Digest(der, (size_t)len, md, &mdlen, EVP_sha256(), NULL);
    strcpy(out, "sha256:");
    for (unsigned i = 0; i < mdlen; i++)
      sprintf(out + 7 + 2 * i, "%02x", md[i]);
  }
  OPENSSL_free(name);
  OPENSSL_free(header);
  OPENSSL_free(der);
  BIO_free(b);
}

static void test_create_load(void)
{
  char *base = make_tmpdir("link-id");
  char *dir = path_in(base, "site");   /* does not exist yet */
  char err[512] = "";
  bool created = false;

  CHECK(link_identity_init(dir, "onprem-1", &created, err, sizeof err) == 0);
  CHECK(created);
  char *key_path = path_in(dir, "site.key"), *cert_path = path_in(dir, "site.crt");
  struct stat st;
  CHECK(stat(dir, &st) == 0 && (st.st_mode & 0777) == 0700);
  CHECK(stat(key_path, &st) == 0 && (st.st_mode & 0777) == 0600);
  CHECK(stat(cert_path, &st) == 0 && (st.st_mode & 0777) == 0644);

  struct link_identity *id = link_identity_load(dir, err, sizeof err);
  CHECK(id != NULL);
  if (!id) {
    fprintf(stderr, "load: %s\n", err);
    exit(1);
  }
  char fp[LINK_FINGERPRINT_LEN], here[LINK_FINGERPRINT_LEN];
  snprintf(fp, sizeof fp, "%s", link_identity_fingerprint(id));
  CHECK(link_fingerprint_is_valid(fp));
  CHECK(strcmp(link_identity_name(id), "onprem-1") == 0);
  const char *pem = link_identity_cert_pem(id);
  CHECK(pem && strstr(pem, "-----BEGIN CERTIFICATE-----") == pem);
  fingerprint_here(pem, here);
  CHECK(strcmp(fp, here) == 0);
  char *file_pem = read_file(cert_path);
  fingerprint_here(file_pem, here);
  CHECK(strcmp(fp, here) == 0);
  char fp2[LINK_FINGERPRINT_LEN];
  CHECK(link_fingerprint_of_pem(pem, fp2, err, sizeof err) == 0 && strcmp(fp, fp2) == 0);

  /* What the certificate is made of. */
  BIO *b = BIO_new_mem_buf(pem, -1);
  X509 *x = PEM_read_bio_X509(b, NULL, NULL, NULL);
  BIO_free(b);
  CHECK(x != NULL);
  if (x) {
    CHECK(X509_get_version(x) == X509_VERSION_3);
    EVP_PKEY *pub = X509_get0_pubkey(x);
    char group[64] = "";
    size_t glen;
    CHECK(pub && EVP_PKEY_is_a(pub, "EC") &&
          EVP_PKEY_get_utf8_string_param(pub, "group", group, sizeof group, &glen) &&
          strcmp(group, "prime256v1") == 0);
    CHECK(X509_verify(x, pub) == 1);                      /* self-signed */
    CHECK(X509_NAME_cmp(X509_get_subject_name(x), X509_get_issuer_name(x)) == 0);
    char cn[128] = "";
    X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof cn);
    CHECK(strcmp(cn, "onprem-1") == 0);
    CHECK(X509_check_ca(x) == 0);
    CHECK(X509_get_extension_flags(x) & EXFLAG_XKUSAGE);
    CHECK((X509_get_extended_key_usage(x) & (XKU_SSL_SERVER | XKU_SSL_CLIENT)) ==
          (XKU_SSL_SERVER | XKU_SSL_CLIENT));
    int days = 0, secs = 0;
    CHECK(ASN1_TIME_diff(&days, &secs, NULL, X509_get0_notAfter(x)) && days > 3640 && days <= 3650);
    CHECK(X509_cmp_current_time(X509_get0_notBefore(x)) < 0);
    X509_free(x);
  }
  char *key_pem = read_file(key_path);
  CHECK(key_pem && strstr(key_pem, "-----BEGIN PRIVATE KEY-----"));
  /* A private key is never taken for a certificate, and the error says so. */
  CHECK(link_fingerprint_of_pem(key_pem, fp2, err, sizeof err) == -1);
  CHECK(strstr(err, "PRIVATE KEY") != NULL);
  link_identity_free(id);

  /* Init again: nothing made, same identity. */
  created = true;
  CHECK(link_identity_init(dir, "onprem-1", &created, err, sizeof err) == 0 && !created);
  id = link_identity_load(dir, err, sizeof err);
  CHECK(id && strcmp(link_identity_fingerprint(id), fp) == 0);
  link_identity_free(id);

  /* A second site differs. */
  char *dir2 = path_in(base, "other");
  CHECK(link_identity_init(dir2, "cloud.eu-1", &created, err, sizeof err) == 0 && created);
  struct link_identity *id2 = link_identity_load(dir2, err, sizeof err);
  CHECK(id2 && strcmp(link_identity_fingerprint(id2), fp) != 0);
  CHECK(id2 && strcmp(link_identity_name(id2), "cloud.eu-1") == 0);

  /* Two certificates in one PEM, and garbage. */
  char *two;
  CHECK(asprintf(&two, "%s%s", pem ? file_pem : "", link_identity_cert_pem(id2)) > 0);
  CHECK(link_fingerprint_of_pem(two, fp2, err, sizeof err) == -1 &&
        strstr(err, "more than one certificate"));
  CHECK(link_fingerprint_of_pem("hello", fp2, err, sizeof err) == -1 && strstr(err, "not PEM"));
  CHECK(link_fingerprint_of_pem("", fp2, err, sizeof err) == -1);
  CHECK(link_fingerprint_of_pem(NULL, fp2, err, sizeof err) == -1);
  CHECK(link_fingerprint_of_pem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                                fp2, err, sizeof err) == -1);
  /* Text around the PEM block is allowed (as openssl prints it). */
  char *noted;
  CHECK(asprintf(&noted, "subject=CN = onprem-1\n%s\n", file_pem) > 0);
  CHECK(link_fingerprint_of_pem(noted, fp2, err, sizeof err) == 0 && strcmp(fp2, fp) == 0);
  free(noted);
  free(two);

  /* A certificate that is not the key's. */
  char *other_cert = path_in(dir2, "site.crt");
  char *swap = read_file(other_cert);
  write_file(cert_path, swap);
  CHECK(link_identity_load(dir, err, sizeof err) == NULL && strstr(err, "do not belong together"));
  write_file(cert_path, file_pem);
  id = link_identity_load(dir, err, sizeof err);
  CHECK(id && strcmp(link_identity_fingerprint(id), fp) == 0);
  link_identity_free(id);
  free(swap);
  free(other_cert);
  link_identity_free(id2);

  /* Damaged files. */
  char *bad = strdup(file_pem);
  bad[strlen(bad) / 2] ^= 0x01;
  write_file(cert_path, bad);
  CHECK(link_identity_load(dir, err, sizeof err) == NULL && strstr(err, "site.crt"));
  write_file(cert_path, "not a certificate\n");
  CHECK(link_identity_load(dir, err, sizeof err) == NULL && strstr(err, "site.crt"));
  write_file(cert_path, file_pem);
  char *cut = strdup(key_pem);
  cut[strlen(cut) / 2] = '\0';
  write_file(key_path, cut);
  CHECK(link_identity_load(dir, err, sizeof err) == NULL && strstr(err, "site.key"));
  write_file(key_path, "");
  CHECK(link_identity_load(dir, err, sizeof err) == NULL && strstr(err, "site.key"));
  write_file(key_path, key_pem);
  chmod(key_path, 0600);
  id = link_identity_load(dir, err, sizeof err);
  CHECK(id != NULL);
  link_identity_free(id);
  free(bad);
  free(cut);

  /* Half an identity: never replaced, named in the error. */
  unlink(cert_path);
  CHECK(link_identity_init(dir, "onprem-1", &created, err, sizeof err) == -1 && !created);
  CHECK(strstr(err, "site.key exists without") != NULL);
  CHECK(link_identity_load(dir, err, sizeof err) == NULL && strstr(err, "site.crt"));
  char *still = read_file(key_path);
  CHECK(still && strcmp(still, key_pem) == 0);   /* the key was left alone */
  free(still);
  write_file(cert_path, file_pem);
  unlink(key_path);
  CHECK(link_identity_init(dir, "onprem-1", &created, err, sizeof err) == -1);
  CHECK(strstr(err, "site.crt exists without") != NULL);
  CHECK(link_identity_load(dir, err, sizeof err) == NULL && strstr(err, "site.key"));

  /* Bad names, a dir that cannot be one. */
  CHECK(link_identity_init(dir2, "", &created, err, sizeof err) == -1);
  CHECK(link_identity_init(dir2, "-x", &created, err, sizeof err) == -1);
  CHECK(link_identity_init(dir2, "a b", &created, err, sizeof err) == -1);
  CHECK(link_identity_init(cert_path, "x", &created, err, sizeof err) == -1);   /* a file */
  CHECK(link_identity_load("/nonexistent/ferry", err, sizeof err) == NULL);

  free(file_pem);
  free(key_pem);
  free(key_path);
  free(cert_path);
  free(dir);
  free(dir2);
  remove_tree(base);
}

static void test_fingerprint_syntax(void)
{
  char good[LINK_FINGERPRINT_LEN] = "sha256:";
  for (int i = 0; i < 64; i++)
    good[7 + i] = "0123456789abcdef"[i % 16];
  good[71] = '\0';
  CHECK(link_fingerprint_is_valid(good));
  char t[LINK_FINGERPRINT_LEN + 8];
  strcpy(t, good);
  t[10] = 'A';
  CHECK(!link_fingerprint_is_valid(t));   /* lower case only */
  strcpy(t, good);
  t[70] = '\0';
  CHECK(!link_fingerprint_is_valid(t));   /* short */
  strcpy(t, good);
  strcat(t, "0");
  CHECK(!link_fingerprint_is_valid(t));   /* long */
  strcpy(t, good);
  memcpy(t, "sha1:", 5);
  CHECK(!link_fingerprint_is_valid(t));
  CHECK(!link_fingerprint_is_valid(""));
  CHECK(!link_fingerprint_is_valid(NULL));
  CHECK(!link_fingerprint_is_valid("sha256:"));
}

int main(void)
{
  test_create_load();
  test_fingerprint_syntax();
  if (failures) {
    fprintf(stderr, "test_link_identity: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_link_identity: ok\n");
  return 0;
}
