/* identity: a site's key pair and self-signed certificate, and the
 * fingerprints by which sites trust each other (link.h).
 *
 * DESIGN
 * DIR/site.key is an ECDSA P-256 key, PKCS#8 PEM, mode 0600; DIR/site.crt a
 * self-signed X.509 v3 certificate, CN = site name, valid 10 years, with
 * basicConstraints CA:FALSE, keyUsage digitalSignature and extendedKeyUsage
 * serverAuth + clientAuth (so stock TLS tools accept it in either role).
 * Nobody checks the signature or the dates: the certificate only carries the
 * public key and a name, and a peer is trusted by the SHA-256 of its DER
 * encoding, which the operator paired (see conn.c).
 *
 * Files are written by temp file + fsync + no-replace rename + directory
 * fsync, key first.  Init never replaces anything: a key without its
 * certificate (or the reverse: a crash between the two renames, or an
 * operator's mistake) is an error that names the file, because a new key
 * silently made would unpair the site from every peer.
 *
 * A loaded identity also owns the two TLS contexts (client and server role)
 * that every connection of the site is made from; a connection keeps its
 * own reference, so an identity may be freed while its connections live
 * (but not while a listener started with it runs).
 *
 * Thread model: an identity is immutable after load and may be shared by
 * every thread.  Naming: link_identity_* and link_fingerprint_* are public
 * (link.h); link_fingerprint_of_x509 and link_identity_ssl_ctx internal
 * (link_int.h). */
#include "link/link_int.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>

#include "common/log.h"
#include "common/util.h"

#define KEY_FILE      "site.key"
#define CERT_FILE     "site.crt"
#define PEM_MAX       (64 * 1024)      /* larger "PEM" files are not ours */
#define CERT_DAYS     3650
#define BACKDATE_S    3600             /* notBefore an hour back: peers' clocks differ */

struct link_identity {
  X509 *cert;
  EVP_PKEY *key;
  char fingerprint[LINK_FINGERPRINT_LEN];
  char *cert_pem;                      /* PEM of cert, as we would write it */
  char *name;                          /* CN, UTF-8, "" if none */
  SSL_CTX *client_ctx, *server_ctx;
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
  if (!err || !errlen)
    return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

/* The reason of OpenSSL's latest error on this thread ("unknown" if none);
 * the queue is cleared so the next failure is not confused with it. */
static const char *ossl_reason(char *buf, size_t len)
{
  unsigned long e = ERR_peek_last_error();
  const char *r = e ? ERR_reason_error_string(e) : NULL;
  if (r)
    snprintf(buf, len, "%s", r);
  else if (e)
    ERR_error_string_n(e, buf, len);
  else
    snprintf(buf, len, "unknown error");
  ERR_clear_error();
  return buf;
}

/* ---- fingerprints ---- */

int link_fingerprint_of_x509(X509 *x, char out[LINK_FINGERPRINT_LEN])
{
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (!X509_digest(x, EVP_sha256(), md, &n) || n != 32)
    return -1;
  static const char hex[] = "0123456789abcdef";
  memcpy(out, "sha256:", 7);
  for (unsigned i = 0; i < 32; i++) {
    out[7 + 2 * i] = hex[md[i] >> 4];
    out[8 + 2 * i] = hex[md[i] & 15];
  }
  out[7 + 64] = '\0';
  return 0;
}

bool link_fingerprint_is_valid(const char *s)
{
  if (!s || strncmp(s, "sha256:", 7) != 0)
    return false;
  for (int i = 0; i < 64; i++) {
    char ch = s[7 + i];
    if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f')))
      return false;
  }
  return s[7 + 64] == '\0';
}

/* Parses exactly one PEM certificate: every PEM block in the text must be a
 * CERTIFICATE, there must be one, and its DER must have nothing after it.
 * Returns the certificate, or NULL with err. */
static X509 *cert_of_pem(const char *pem, size_t len, char *err, size_t errlen)
{
  if (len > PEM_MAX) {
    set_err(err, errlen, "not a certificate: %zu bytes of PEM, more than %d", len, PEM_MAX);
    return NULL;
  }
  BIO *bio = BIO_new_mem_buf(pem, (int)len);
  if (!bio) {
    set_err(err, errlen, "out of memory");
    return NULL;
  }
  X509 *cert = NULL;
  int blocks = 0;
  char why[160];
  for (;;) {
    char *name = NULL, *header = NULL;
    unsigned char *data = NULL;
    long dlen = 0;
    if (!PEM_read_bio(bio, &name, &header, &data, &dlen)) {
      unsigned long e = ERR_peek_last_error();
      bool end = ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE;
      if (!end || blocks == 0) {
        if (blocks == 0 && end)
          set_err(err, errlen, "not PEM: no BEGIN CERTIFICATE line");
        else
          set_err(err, errlen, "bad PEM: %s", ossl_reason(why, sizeof why));
        X509_free(cert);
        cert = NULL;
      }
      ERR_clear_error();
      break;
    }
    blocks++;
    bool ok = false;
    if (strcmp(name, PEM_STRING_X509) != 0) {
      set_err(err, errlen, "not a certificate: the PEM holds a '%s' block%s", name,
              strstr(name, "PRIVATE KEY") ? " (never send a private key)" : "");
    } else if (cert) {
      set_err(err, errlen, "more than one certificate in the PEM");
    } else {
      const unsigned char *p = data;
      cert = d2i_X509(NULL, &p, dlen);
      if (!cert)
        set_err(err, errlen, "not a certificate: %s", ossl_reason(why, sizeof why));
      else if (p != data + dlen)
        set_err(err, errlen, "not a certificate: %ld stray bytes after it", (long)(data + dlen - p));
      else
        ok = true;
    }
    OPENSSL_free(name);
    OPENSSL_free(header);
    OPENSSL_free(data);
    if (!ok) {
      X509_free(cert);
      cert = NULL;
      break;
    }
  }
  BIO_free(bio);
  return cert;
}

int link_fingerprint_of_pem(const char *pem, char out[LINK_FINGERPRINT_LEN], char *err,
                            size_t errlen)
{
  if (!pem) {
    set_err(err, errlen, "no certificate given");
    return -1;
  }
  X509 *cert = cert_of_pem(pem, strnlen(pem, PEM_MAX + 1), err, errlen);
  if (!cert)
    return -1;
  int rc = link_fingerprint_of_x509(cert, out);
  if (rc < 0)
    set_err(err, errlen, "cannot hash the certificate");
  X509_free(cert);
  return rc;
}

/* ---- files ---- */

static int join_path(char *out, size_t outlen, const char *dir, const char *name,
                     char *err, size_t errlen)
{
  if ((size_t)snprintf(out, outlen, "%s/%s", dir, name) >= outlen) {
    set_err(err, errlen, "path too long: %s/%s", dir, name);
    return -1;
  }
  return 0;
}

/* 1: a regular file; 0: nothing there; -1 with err (something else). */
static int file_exists(const char *path, char *err, size_t errlen)
{
  struct stat st;
  if (stat(path, &st) < 0) {
    if (errno == ENOENT)
      return 0;
    set_err(err, errlen, "cannot stat %s: %s", path, strerror(errno));
    return -1;
  }
  if (!S_ISREG(st.st_mode)) {
    set_err(err, errlen, "%s is not a regular file", path);
    return -1;
  }
  return 1;
}

/* Writes data to path by temp file + fsync + rename that never replaces an
 * existing file. */
static int write_new_file(const char *path, const void *data, size_t len, mode_t mode,
                          char *err, size_t errlen)
{
  char tmp[PATH_MAX];
  if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp-XXXXXX", path) >= sizeof tmp) {
    set_err(err, errlen, "path too long: %s", path);
    return -1;
  }
  int fd = mkostemp(tmp, O_CLOEXEC);   /* mode 0600 from the start: the key never shows */
  if (fd < 0) {
    set_err(err, errlen, "cannot create %s: %s", tmp, strerror(errno));
    return -1;
  }
  if (fchmod(fd, mode) < 0 || write_full(fd, data, len) < 0 || fsync(fd) < 0) {
    set_err(err, errlen, "cannot write %s: %s", tmp, strerror(errno));
    close(fd);
    unlink(tmp);
    return -1;
  }
  if (close(fd) < 0) {
    set_err(err, errlen, "cannot write %s: %s", tmp, strerror(errno));
    unlink(tmp);
    return -1;
  }
  int r = renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RENAME_NOREPLACE);
  if (r < 0 && (errno == EINVAL || errno == ENOSYS)) {
    /* A file system without RENAME_NOREPLACE: link() never replaces either. */
    r = link(tmp, path);
    if (r == 0)
      unlink(tmp);
  }
  if (r < 0) {
    set_err(err, errlen, "cannot create %s: %s", path, strerror(errno));
    unlink(tmp);
    return -1;
  }
  return 0;
}

/* Reads a small file into a NUL-terminated buffer (free it). */
static char *read_small_file(const char *path, size_t *len, char *err, size_t errlen)
{
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    set_err(err, errlen, "cannot open %s: %s", path, strerror(errno));
    return NULL;
  }
  struct stat st;
  if (fstat(fd, &st) < 0) {
    set_err(err, errlen, "cannot stat %s: %s", path, strerror(errno));
    close(fd);
    return NULL;
  }
  if (!S_ISREG(st.st_mode) || st.st_size > PEM_MAX) {
    set_err(err, errlen, "%s is not a PEM file (not a regular file of at most %d bytes)", path,
            PEM_MAX);
    close(fd);
    return NULL;
  }
  char *buf = malloc((size_t)st.st_size + 1);
  if (!buf) {
    set_err(err, errlen, "out of memory");
    close(fd);
    return NULL;
  }
  size_t n = 0;
  while (n < (size_t)st.st_size) {   /* a file that shrank meanwhile is simply shorter */
    ssize_t r = read(fd, buf + n, (size_t)st.st_size - n);
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0) {
      set_err(err, errlen, "cannot read %s: %s", path, strerror(errno));
      close(fd);
      free(buf);
      return NULL;
    }
    if (r == 0)
      break;
    n += (size_t)r;
  }
  close(fd);
  buf[n] = '\0';
  *len = n;
  return buf;
}

/* ---- creation ---- */

static int add_ext(X509 *x, int nid, const char *value)
{
  X509V3_CTX v3;
  X509V3_set_ctx_nodb(&v3);
  X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
  X509_EXTENSION *e = X509V3_EXT_conf_nid(NULL, &v3, nid, value);
  if (!e)
    return -1;
  int ok = X509_add_ext(x, e, -1);
  X509_EXTENSION_free(e);
  return ok ? 0 : -1;
}

/* A self-signed v3 certificate for key with CN = name. */
static X509 *make_cert(EVP_PKEY *key, const char *name)
{
  X509 *x = X509_new();
  BIGNUM *serial = BN_new();
  unsigned char rnd[16];
  bool ok = x && serial && RAND_bytes(rnd, sizeof rnd) == 1;
  if (ok) {
    rnd[0] = (rnd[0] & 0x7f) | 0x40;   /* positive, and always 16 bytes long */
    ok = BN_bin2bn(rnd, sizeof rnd, serial) && BN_to_ASN1_INTEGER(serial, X509_get_serialNumber(x));
  }
  X509_NAME *subject = ok ? X509_get_subject_name(x) : NULL;
  ok = ok && X509_set_version(x, X509_VERSION_3) &&
       X509_gmtime_adj(X509_getm_notBefore(x), -BACKDATE_S) &&
       X509_time_adj_ex(X509_getm_notAfter(x), CERT_DAYS, 0, NULL) &&
       X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_UTF8, (const unsigned char *)name,
                                  -1, -1, 0) &&
       X509_set_issuer_name(x, subject) && X509_set_pubkey(x, key) &&
       add_ext(x, NID_basic_constraints, "critical,CA:FALSE") == 0 &&
       add_ext(x, NID_key_usage, "critical,digitalSignature") == 0 &&
       add_ext(x, NID_ext_key_usage, "serverAuth,clientAuth") == 0 &&
       add_ext(x, NID_subject_key_identifier, "hash") == 0 &&
       X509_sign(x, key, EVP_sha256()) > 0;
  BN_free(serial);
  if (!ok) {
    X509_free(x);
    return NULL;
  }
  return x;
}

/* PEM text of a key (private) or certificate, malloc'ed, NUL-terminated. */
static char *pem_of(EVP_PKEY *key, X509 *cert, size_t *len)
{
  BIO *bio = BIO_new(BIO_s_mem());
  if (!bio)
    return NULL;
  int ok = key ? PEM_write_bio_PrivateKey(bio, key, NULL, NULL, 0, NULL, NULL)
               : PEM_write_bio_X509(bio, cert);
  char *out = NULL;
  char *data;
  long n = BIO_get_mem_data(bio, &data);
  if (ok && n > 0 && (out = malloc((size_t)n + 1))) {
    memcpy(out, data, (size_t)n);
    out[n] = '\0';
    *len = (size_t)n;
  }
  BIO_free(bio);
  return out;
}

int link_identity_init(const char *dir, const char *site_name, bool *created,
                       char *err, size_t errlen)
{
  *created = false;
  if (!name_is_valid(site_name)) {
    set_err(err, errlen, "bad site name '%s': 1..64 of [A-Za-z0-9._-], not starting with . or -",
            site_name ? site_name : "");
    return -1;
  }
  if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
    set_err(err, errlen, "cannot create %s: %s", dir, strerror(errno));
    return -1;
  }
  char key_path[PATH_MAX], cert_path[PATH_MAX];
  if (join_path(key_path, sizeof key_path, dir, KEY_FILE, err, errlen) < 0 ||
      join_path(cert_path, sizeof cert_path, dir, CERT_FILE, err, errlen) < 0)
    return -1;
  int have_key = file_exists(key_path, err, errlen);
  int have_cert = have_key < 0 ? -1 : file_exists(cert_path, err, errlen);
  if (have_key < 0 || have_cert < 0)
    return -1;
  if (have_key && have_cert)
    return 0;
  if (have_key || have_cert) {
    set_err(err, errlen,
            "%s exists without %s: refusing to make a new identity over it (a new key "
            "unpairs this site from its peers); restore the missing file or remove both",
            have_key ? key_path : cert_path, have_key ? cert_path : key_path);
    return -1;
  }

  char why[160];
  int rc = -1;
  char *key_pem = NULL, *cert_pem = NULL;
  size_t key_len = 0, cert_len = 0;
  X509 *cert = NULL;
  EVP_PKEY *key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
  if (!key) {
    set_err(err, errlen, "cannot make a P-256 key: %s", ossl_reason(why, sizeof why));
    goto out;
  }
  if (!(cert = make_cert(key, site_name))) {
    set_err(err, errlen, "cannot make the certificate: %s", ossl_reason(why, sizeof why));
    goto out;
  }
  key_pem = pem_of(key, NULL, &key_len);
  cert_pem = pem_of(NULL, cert, &cert_len);
  if (!key_pem || !cert_pem) {
    set_err(err, errlen, "cannot encode the identity: %s", ossl_reason(why, sizeof why));
    goto out;
  }
  if (write_new_file(key_path, key_pem, key_len, 0600, err, errlen) < 0)
    goto out;
  if (write_new_file(cert_path, cert_pem, cert_len, 0644, err, errlen) < 0) {
    unlink(key_path);   /* ours, made a moment ago, and never used */
    goto out;
  }
  if (fsync_parent_dir(cert_path) < 0) {
    set_err(err, errlen, "cannot sync %s: %s", dir, strerror(errno));
    goto out;
  }
  *created = true;
  rc = 0;
out:
  if (key_pem)
    OPENSSL_cleanse(key_pem, key_len);
  free(key_pem);
  free(cert_pem);
  X509_free(cert);
  EVP_PKEY_free(key);
  return rc;
}

/* ---- loading ---- */

static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
  return -1;   /* an encrypted key cannot be used unattended */
}

struct link_identity *link_identity_load(const char *dir, char *err, size_t errlen)
{
  char key_path[PATH_MAX], cert_path[PATH_MAX], why[160];
  if (join_path(key_path, sizeof key_path, dir, KEY_FILE, err, errlen) < 0 ||
      join_path(cert_path, sizeof cert_path, dir, CERT_FILE, err, errlen) < 0)
    return NULL;
  struct link_identity *id = calloc(1, sizeof *id);
  if (!id) {
    set_err(err, errlen, "out of memory");
    return NULL;
  }
  size_t key_len = 0, cert_len = 0;
  char *key_text = read_small_file(key_path, &key_len, err, errlen);
  char *cert_text = key_text ? read_small_file(cert_path, &cert_len, err, errlen) : NULL;
  if (!cert_text)
    goto fail;

  struct stat st;
  if (stat(key_path, &st) == 0 && (st.st_mode & 077))
    log_warn(NULL, "site link: %s is readable by others (mode %03o); it should be 0600",
             key_path, (unsigned)(st.st_mode & 0777));

  BIO *bio = BIO_new_mem_buf(key_text, (int)key_len);
  if (bio)
    id->key = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL);
  BIO_free(bio);
  if (!id->key) {
    set_err(err, errlen, "%s: not a usable private key: %s", key_path,
            ossl_reason(why, sizeof why));
    goto fail;
  }
  char group[64] = "";
  size_t glen = 0;
  if (!EVP_PKEY_is_a(id->key, "EC") ||
      !EVP_PKEY_get_utf8_string_param(id->key, "group", group, sizeof group, &glen) ||
      strcmp(group, "prime256v1") != 0) {
    ERR_clear_error();
    set_err(err, errlen, "%s: not an ECDSA P-256 key (%s%s%s)", key_path,
            EVP_PKEY_get0_type_name(id->key) ? EVP_PKEY_get0_type_name(id->key) : "unknown",
            group[0] ? " " : "", group);
    goto fail;
  }
  char cerr[200];
  id->cert = cert_of_pem(cert_text, cert_len, cerr, sizeof cerr);
  if (!id->cert) {
    set_err(err, errlen, "%s: %s", cert_path, cerr);
    goto fail;
  }
  if (X509_check_private_key(id->cert, id->key) != 1) {
    ERR_clear_error();
    set_err(err, errlen, "%s and %s do not belong together (the certificate is for another key)",
            cert_path, key_path);
    goto fail;
  }
  if (link_fingerprint_of_x509(id->cert, id->fingerprint) < 0) {
    set_err(err, errlen, "%s: cannot hash the certificate", cert_path);
    goto fail;
  }
  size_t pem_len;
  if (!(id->cert_pem = pem_of(NULL, id->cert, &pem_len))) {
    set_err(err, errlen, "out of memory");
    goto fail;
  }
  X509_NAME *subject = X509_get_subject_name(id->cert);
  int idx = subject ? X509_NAME_get_index_by_NID(subject, NID_commonName, -1) : -1;
  unsigned char *utf8 = NULL;
  int ulen = idx >= 0 ? ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(
                                              X509_NAME_get_entry(subject, idx)))
                      : 0;
  id->name = strndup(ulen > 0 ? (const char *)utf8 : "", ulen > 0 ? (size_t)ulen : 0);
  OPENSSL_free(utf8);
  if (!id->name) {
    set_err(err, errlen, "out of memory");
    goto fail;
  }
  char terr[200];
  if (!(id->client_ctx = link_tls_ctx_new(id->cert, id->key, false, terr, sizeof terr)) ||
      !(id->server_ctx = link_tls_ctx_new(id->cert, id->key, true, terr, sizeof terr))) {
    set_err(err, errlen, "%s: %s", dir, terr);
    goto fail;
  }
  OPENSSL_cleanse(key_text, key_len);
  free(key_text);
  free(cert_text);
  return id;

fail:
  if (key_text)
    OPENSSL_cleanse(key_text, key_len);
  free(key_text);
  free(cert_text);
  link_identity_free(id);
  ERR_clear_error();
  return NULL;
}

void link_identity_free(struct link_identity *id)
{
  if (!id)
    return;
  SSL_CTX_free(id->client_ctx);
  SSL_CTX_free(id->server_ctx);
  X509_free(id->cert);
  EVP_PKEY_free(id->key);
  free(id->cert_pem);
  free(id->name);
  free(id);
}

const char *link_identity_fingerprint(const struct link_identity *id) { return id->fingerprint; }
const char *link_identity_cert_pem(const struct link_identity *id) { return id->cert_pem; }
const char *link_identity_name(const struct link_identity *id) { return id->name; }

SSL_CTX *link_identity_ssl_ctx(const struct link_identity *id, bool server)
{
  return server ? id->server_ctx : id->client_ctx;
}
