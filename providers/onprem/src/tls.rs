//! TLS with client certificates (mTLS) for plugins served over TCP: the
//! plugin presents its certificate and accepts only clients whose
//! certificate chains to its client CA; cnlb-ccm checks the plugin's
//! certificate against its CA and presents its own. A unix socket needs
//! none of this: its file mode (0600) decides who may call.
//!
//! Certificates and keys are PEM files read once, at start: a rotated
//! certificate takes effect when the process restarts. Every file comes
//! with the flag that named it, so each error names the flag, and every
//! check runs at load time, so a bad file stops the start rather than
//! failing the first handshake.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// How long a TLS handshake may take, both ways: a peer that stalls does
/// not hold a connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The PEM labels of the private keys rustls reads (PKCS#8, PKCS#1, SEC1).
const KEY_LABELS: [&str; 3] = ["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"];

/// A PEM file and the flag that named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemFile {
    pub flag: &'static str,
    pub path: PathBuf,
}

impl PemFile {
    pub fn new(flag: &'static str, path: impl Into<PathBuf>) -> PemFile {
        PemFile {
            flag,
            path: path.into(),
        }
    }

    fn name(&self) -> String {
        format!("{} {}", self.flag, self.path.display())
    }
}

/// A file that cannot serve: `what` names its flag and path (or the two
/// of a certificate and its key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct TlsError {
    pub what: String,
    pub reason: String,
}

fn invalid(what: impl Into<String>, reason: impl Into<String>) -> TlsError {
    TlsError {
        what: what.into(),
        reason: reason.into(),
    }
}

/// The plugin's side: its certificate and key, and the CA that client
/// certificates must chain to. A client without such a certificate fails
/// the handshake.
#[derive(Clone)]
pub struct ServerTls {
    config: ServerTlsConfig,
}

impl ServerTls {
    pub fn load(cert: &PemFile, key: &PemFile, client_ca: &PemFile) -> Result<ServerTls, TlsError> {
        let identity = identity(cert, key)?;
        let ca = certificates(client_ca)?;
        check_trust_anchors(identity.clone(), ca.clone(), client_ca)?;
        let config = ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(ca)
            .timeout(HANDSHAKE_TIMEOUT);
        Ok(ServerTls { config })
    }

    pub(crate) fn config(&self) -> ServerTlsConfig {
        self.config.clone()
    }
}

/// cnlb-ccm's side: the CA the plugin's certificate must chain to, the
/// client certificate and key it presents, and the name the plugin's
/// certificate must carry.
#[derive(Clone)]
pub struct ClientTls {
    config: ClientTlsConfig,
}

impl ClientTls {
    /// `server_name`: a DNS name (or IP address) among the plugin
    /// certificate's subject alternative names. `None`: the IP address of
    /// the endpoint, which must then be an IP SAN of the certificate (rustls
    /// checks IP SANs).
    pub fn load(
        ca: &PemFile,
        cert: &PemFile,
        key: &PemFile,
        server_name: Option<&str>,
    ) -> Result<ClientTls, TlsError> {
        let ca_pem = certificates(ca)?;
        let identity = identity(cert, key)?;
        check_trust_anchors(identity.clone(), ca_pem.clone(), ca)?;
        let mut config = ClientTlsConfig::new()
            .ca_certificate(ca_pem)
            .identity(identity)
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(name) = server_name {
            check_server_name(name).map_err(|reason| invalid("TLS server name", reason))?;
            config = config.domain_name(name);
        }
        // Built once now as connecting will, so that nothing is left to
        // fail later.
        Endpoint::from_static("https://127.0.0.1")
            .tls_config(config.clone())
            .map_err(|e| {
                let files = format!("{}, {}", ca.name(), pair(cert, key));
                invalid(files, chain(&e))
            })?;
        Ok(ClientTls { config })
    }

    pub(crate) fn config(&self) -> ClientTlsConfig {
        self.config.clone()
    }
}

/// Whether `name` can be checked against a certificate: a DNS name or an
/// IP address (for a command-line value parser).
pub fn check_server_name(name: &str) -> Result<(), String> {
    Endpoint::from_static("https://127.0.0.1")
        .tls_config(ClientTlsConfig::new().domain_name(name))
        .map(drop)
        .map_err(|e| {
            format!(
                "{name:?} is neither a DNS name nor an IP address ({})",
                chain(&e)
            )
        })
}

fn pair(cert: &PemFile, key: &PemFile) -> String {
    format!("{} and {}", cert.name(), key.name())
}

fn read(file: &PemFile) -> Result<String, TlsError> {
    let bytes = std::fs::read(&file.path)
        .map_err(|e| invalid(file.name(), format!("cannot read it: {e}")))?;
    String::from_utf8(bytes).map_err(|_| {
        invalid(
            file.name(),
            "not PEM text (binary DER? convert it: openssl x509 -inform der)",
        )
    })
}

/// The PEM text of `file`, which holds at least one certificate.
fn certificates(file: &PemFile) -> Result<Certificate, TlsError> {
    let text = read(file)?;
    let labels = pem_labels(&text).map_err(|reason| invalid(file.name(), reason))?;
    if !labels.contains(&"CERTIFICATE") {
        return Err(invalid(
            file.name(),
            format!("no PEM CERTIFICATE block{}", found(&labels)),
        ));
    }
    Ok(Certificate::from_pem(text))
}

/// A certificate (chain) and its private key: one key, unencrypted, that
/// matches the certificate (rustls checks that while building).
fn identity(cert: &PemFile, key: &PemFile) -> Result<Identity, TlsError> {
    let cert_pem = certificates(cert)?;
    let text = read(key)?;
    let labels = pem_labels(&text).map_err(|reason| invalid(key.name(), reason))?;
    let keys = labels.iter().filter(|l| KEY_LABELS.contains(l)).count();
    if labels.contains(&"ENCRYPTED PRIVATE KEY") {
        return Err(invalid(
            key.name(),
            "the private key is encrypted; decrypt it (openssl pkey -in KEY -out KEY.plain)",
        ));
    }
    if keys != 1 {
        return Err(invalid(
            key.name(),
            format!(
                "expected one private key (PEM {}), found {keys}{}",
                KEY_LABELS.join(", "),
                found(&labels)
            ),
        ));
    }
    let identity = Identity::from_pem(cert_pem.into_inner(), text);
    // Building a server configuration with the identity alone parses both
    // and checks that the key matches the certificate: an error here is
    // about these two files.
    Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity.clone()))
        .map_err(|e| invalid(pair(cert, key), chain(&e)))?;
    Ok(identity)
}

/// rustls skips CA certificates it cannot parse; with none left the
/// client-certificate verifier fails to build, which tells us, rather than
/// every handshake failing later with "unknown issuer". (On the client
/// side this builds a throwaway server configuration with the client's
/// own identity: the check is the same.)
fn check_trust_anchors(
    identity: Identity,
    ca: Certificate,
    file: &PemFile,
) -> Result<(), TlsError> {
    Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity).client_ca_root(ca))
        .map(drop)
        .map_err(|e| {
            invalid(
                file.name(),
                format!("no usable CA certificate: {}", chain(&e)),
            )
        })
}

fn found(labels: &[&str]) -> String {
    if labels.is_empty() {
        " (no PEM block at all)".to_string()
    } else {
        format!(" (found: {})", labels.join(", "))
    }
}

/// The labels of the PEM blocks in `text`, in order (`-----BEGIN X-----`
/// ... `-----END X-----`); text around the blocks is allowed, as openssl
/// writes it. Only the framing is checked here: the TLS library decodes
/// the contents.
fn pem_labels(text: &str) -> Result<Vec<&str>, String> {
    let mut labels = Vec::new();
    let mut open: Option<&str> = None;
    for line in text.lines().map(str::trim) {
        if let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            if let Some(previous) = open {
                return Err(format!("PEM block {previous} has no END line"));
            }
            open = Some(label);
        } else if let Some(label) = line
            .strip_prefix("-----END ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            match open.take() {
                Some(begun) if begun == label => labels.push(label),
                Some(begun) => return Err(format!("PEM block {begun} ends with END {label}")),
                None => return Err(format!("END {label} without BEGIN")),
            }
        }
    }
    match open {
        Some(label) => Err(format!("PEM block {label} has no END line")),
        None => Ok(labels),
    }
}

/// An error and its causes, as one line (tonic's own says only
/// "transport error").
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    use super::*;

    #[test]
    fn pem_framing() {
        let text = "Bag Attributes\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n\
                    -----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert_eq!(pem_labels(text), Ok(vec!["CERTIFICATE", "PRIVATE KEY"]));
        assert_eq!(pem_labels("not pem"), Ok(vec![]));
        assert!(pem_labels("-----BEGIN CERTIFICATE-----\nAAAA\n").is_err());
        assert!(pem_labels("-----BEGIN CERTIFICATE-----\n-----END PRIVATE KEY-----\n").is_err());
        assert!(pem_labels("-----END CERTIFICATE-----\n").is_err());
    }

    /// A CA and two leaf certificates of it, as PEM files in `dir`: ca.pem,
    /// a.pem + a.key (IP SAN 127.0.0.1), b.pem + b.key.
    fn files(dir: &std::path::Path) {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        for name in ["a", "b"] {
            let key = KeyPair::generate().unwrap();
            let params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
            let cert = params.signed_by(&key, &ca).unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        std::fs::write(
            dir.join("garbage.pem"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
    }

    #[test]
    fn every_bad_file_is_named_with_its_flag() {
        let dir = tempfile::tempdir().unwrap();
        files(dir.path());
        let file = |flag, name: &str| PemFile::new(flag, dir.path().join(name));
        let server = |cert: &str, key: &str, ca: &str| {
            ServerTls::load(
                &file("--tls-cert", cert),
                &file("--tls-key", key),
                &file("--tls-client-ca", ca),
            )
            .map(drop)
            .map_err(|e| e.to_string())
        };
        assert_eq!(server("a.pem", "a.key", "ca.pem"), Ok(()));
        let path = |name: &str| dir.path().join(name).display().to_string();
        for (args, flags, reason) in [
            (
                ["missing.pem", "a.key", "ca.pem"],
                vec!["--tls-cert"],
                "cannot read it",
            ),
            (
                ["a.key", "a.key", "ca.pem"],
                vec!["--tls-cert"],
                "no PEM CERTIFICATE block (found: PRIVATE KEY)",
            ),
            (
                ["a.pem", "a.pem", "ca.pem"],
                vec!["--tls-key"],
                "expected one private key",
            ),
            (
                ["a.pem", "b.key", "ca.pem"],
                vec!["--tls-cert", "--tls-key"],
                "",
            ),
            (
                ["a.pem", "a.key", "a.key"],
                vec!["--tls-client-ca"],
                "no PEM CERTIFICATE block",
            ),
            (
                ["a.pem", "a.key", "garbage.pem"],
                vec!["--tls-client-ca"],
                "no usable CA certificate",
            ),
        ] {
            let err = server(args[0], args[1], args[2]).unwrap_err();
            for flag in flags {
                let i = ["--tls-cert", "--tls-key", "--tls-client-ca"]
                    .iter()
                    .position(|f| *f == flag)
                    .unwrap();
                assert!(
                    err.contains(&format!("{flag} {}", path(args[i]))),
                    "{args:?}: {err}"
                );
            }
            assert!(err.contains(reason), "{args:?}: {err}");
        }

        let client = |ca: &str, name| {
            ClientTls::load(
                &file("--ca", ca),
                &file("--cert", "a.pem"),
                &file("--key", "a.key"),
                name,
            )
            .map(drop)
            .map_err(|e| e.to_string())
        };
        assert_eq!(client("ca.pem", None), Ok(()));
        assert_eq!(client("ca.pem", Some("plugin.example")), Ok(()));
        let err = client("garbage.pem", None).unwrap_err();
        assert!(
            err.starts_with("--ca ") && err.contains("no usable CA certificate"),
            "{err}"
        );
        let err = client("ca.pem", Some("not a name")).unwrap_err();
        assert!(
            err.contains("neither a DNS name nor an IP address"),
            "{err}"
        );
    }
}
