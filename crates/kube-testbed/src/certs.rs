//! A throwaway PKI made with the `openssl` command: a CA, the API server's serving
//! certificate for 127.0.0.1, an admin client certificate (group `system:masters`), and the
//! service-account signing key pair.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// The files of the PKI, all in one directory.
#[derive(Clone, Debug)]
pub struct Pki {
    /// The CA certificate: clients trust it, and the API server verifies client
    /// certificates against it.
    pub ca_cert: PathBuf,
    /// The CA key.
    pub ca_key: PathBuf,
    /// The API server's certificate (SANs 127.0.0.1, localhost, the `kubernetes` Service).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// The admin client certificate (CN `testbed-admin`, O `system:masters`).
    pub admin_cert: PathBuf,
    /// Its key.
    pub admin_key: PathBuf,
    /// The private key that signs service-account tokens.
    pub sa_key: PathBuf,
    /// Its public key, which verifies them.
    pub sa_pub: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (Debian's openssl package)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A key and a certificate signed by the CA, with `subject` and the v3 extensions `ext`.
fn issue(dir: &Path, name: &str, subject: &str, ext: &str) -> anyhow::Result<()> {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let crt = format!("{name}.crt");
    let extfile = format!("{name}.ext");
    std::fs::write(dir.join(&extfile), ext)?;
    openssl(dir, &["genrsa", "-out", &key, "2048"])?;
    openssl(
        dir,
        &["req", "-new", "-key", &key, "-subj", subject, "-out", &csr],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-sha256",
            "-extfile",
            &extfile,
            "-out",
            &crt,
        ],
    )
}

/// Makes the PKI in `dir`.
pub fn generate(dir: &Path) -> anyhow::Result<Pki> {
    std::fs::create_dir_all(dir)?;
    openssl(dir, &["genrsa", "-out", "ca.key", "2048"])?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/CN=kube-testbed-ca",
            "-days",
            "30",
            "-sha256",
            "-out",
            "ca.crt",
        ],
    )?;
    issue(
        dir,
        "apiserver",
        "/CN=kube-apiserver",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:198.18.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n",
    )?;
    issue(
        dir,
        "admin",
        "/O=system:masters/CN=testbed-admin",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )?;
    openssl(dir, &["genrsa", "-out", "sa.key", "2048"])?;
    openssl(dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    Ok(Pki {
        ca_cert: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("apiserver.crt"),
        server_key: dir.join("apiserver.key"),
        admin_cert: dir.join("admin.crt"),
        admin_key: dir.join("admin.key"),
        sa_key: dir.join("sa.key"),
        sa_pub: dir.join("sa.pub"),
    })
}
