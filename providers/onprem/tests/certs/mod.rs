//! Certificates for the mutual TLS tests, made with rcgen and written as
//! PEM files: a CA, the plugin's certificate from it (IP SAN 127.0.0.1 and
//! DNS SAN plugin.test), cnlb-ccm's client certificate from the same CA, and
//! a foreign CA with a client certificate of its own.

// Each test file uses some of the files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

/// The PEM files, in the test's directory.
pub struct Files {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub foreign_ca: PathBuf,
    pub foreign_cert: PathBuf,
    pub foreign_key: PathBuf,
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A leaf certificate of `issuer` for `sans`, and its key, as PEM.
fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let sans = sans.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut params = CertificateParams::new(sans).unwrap();
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

pub fn write(dir: &Path) -> Files {
    let ca = new_ca("cnlb test CA");
    let foreign = new_ca("foreign CA");
    let (server_cert, server_key) = leaf(
        &ca,
        &["127.0.0.1", "plugin.test"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(&ca, &["cnlb-ccm"], ExtendedKeyUsagePurpose::ClientAuth);
    let (foreign_cert, foreign_key) =
        leaf(&foreign, &["cnlb-ccm"], ExtendedKeyUsagePurpose::ClientAuth);
    let file = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    Files {
        ca: file("ca.pem", &ca.pem()),
        server_cert: file("server.pem", &server_cert),
        server_key: file("server.key", &server_key),
        client_cert: file("client.pem", &client_cert),
        client_key: file("client.key", &client_key),
        foreign_ca: file("foreign-ca.pem", &foreign.pem()),
        foreign_cert: file("foreign.pem", &foreign_cert),
        foreign_key: file("foreign.key", &foreign_key),
    }
}
