//! `cnlb-onprem-haproxy --tls-cert --tls-key --tls-client-ca`: the plugin
//! binary on TCP with mutual TLS, called by `GrpcProvider` as cnlb-ccm
//! calls it, and the flag combinations it refuses before starting. HAProxy
//! need not run (the plugin checks its configuration with `haproxy -c`,
//! so the binary must be installed: `make env-deps`).

#![allow(clippy::unwrap_used)]

mod certs;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cnlb_provider_core::ProviderError;
use cnlb_provider_onprem::{ClientTls, GrpcProvider, PemFile, PluginEndpoint};

/// The plugin, killed when dropped.
struct PluginProcess(Child);

impl Drop for PluginProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The plugin binary with its HAProxy paths in `dir`, and `args`.
fn plugin(dir: &Path, args: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cnlb-onprem-haproxy"));
    cmd.arg("--config-file")
        .arg(dir.join("haproxy.cfg"))
        .arg("--runtime-socket")
        .arg(dir.join("admin.sock"))
        .arg("--master-socket")
        .arg(dir.join("master.sock"))
        .arg("--address-pool=127.0.0.0/28")
        .args(args)
        .stdout(Stdio::null());
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tls_args(cert: &Path, key: &Path, ca: &Path) -> Vec<String> {
    vec![
        format!("--tls-cert={}", cert.display()),
        format!("--tls-key={}", key.display()),
        format!("--tls-client-ca={}", ca.display()),
    ]
}

/// The plugin's error output when it refuses to start (it must exit, with
/// a failure, within seconds).
fn refused(dir: &Path, args: &[String]) -> String {
    let mut child = plugin(dir, args).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the plugin started with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success(), "{args:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn haproxy_plugin_serves_mutual_tls_on_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let f = certs::write(dir.path());
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut args = tls_args(&f.server_cert, &f.server_key, &f.ca);
    args.push(format!("--listen=tcp://{addr}"));
    // Its log goes to stdout; refused handshakes are logged at debug.
    let log = dir.path().join("plugin.log");
    let _process = PluginProcess(
        plugin(dir.path(), &args)
            .env("RUST_LOG", "info,tonic::transport::server=debug")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("plugin.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let client = |cert: &Path, key: &Path| {
        ClientTls::load(
            &PemFile::new("--onprem-plugin-tls-ca", &f.ca),
            &PemFile::new("--onprem-plugin-tls-cert", cert),
            &PemFile::new("--onprem-plugin-tls-key", key),
            None,
        )
        .unwrap()
    };
    let endpoint = PluginEndpoint::Tcp(addr);
    let ccm = client(&f.client_cert, &f.client_key);
    let mut connected = None;
    for _ in 0..200 {
        if let Ok(p) = GrpcProvider::connect_with_tls(&endpoint, Some(&ccm)).await {
            connected = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(provider) = connected else {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("the plugin did not come up:\n{log}");
    };
    assert_eq!(provider.info().await.unwrap().name, "haproxy");

    // A certificate of another CA is refused. TLS 1.3 checks the client's
    // certificate after the client's side of the handshake is done, so the
    // client mostly sees the connection close (the alert is lost with it);
    // the plugin's log says why, at tonic's debug level.
    let foreign = client(&f.foreign_cert, &f.foreign_key);
    let err = GrpcProvider::lazy_with_tls(&endpoint, Some(&foreign), "onprem")
        .unwrap()
        .info()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::Cloud { operation, retryable: true, .. } if operation == "GetInfo"),
        "{err:?}"
    );
    let reason = "tls accept error error=invalid peer certificate: UnknownIssuer";
    for _ in 0..100 {
        if std::fs::read_to_string(&log).unwrap().contains(reason) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{}", std::fs::read_to_string(&log).unwrap());
}

#[test]
fn haproxy_plugin_refuses_unsafe_or_incomplete_tls_flags() {
    let dir = tempfile::tempdir().unwrap();
    let f = certs::write(dir.path());
    let tls = tls_args(&f.server_cert, &f.server_key, &f.ca);
    let listen = |endpoint: String| vec![format!("--listen={endpoint}")];

    // Plaintext beyond loopback needs --insecure-listen.
    let err = refused(
        dir.path(),
        &listen(format!("tcp://0.0.0.0:{}", free_port())),
    );
    assert!(
        err.contains("plaintext TCP on a non-loopback address")
            && err.contains("--insecure-listen"),
        "{err}"
    );
    // TLS is for TCP; a unix socket has its file mode.
    let sock = format!("unix://{}", dir.path().join("p.sock").display());
    let err = refused(dir.path(), &[listen(sock), tls.clone()].concat());
    assert!(err.contains("are for a tcp:// --listen"), "{err}");
    // The three files go together.
    let err = refused(dir.path(), &tls[..2]);
    assert!(err.contains("--tls-client-ca"), "{err}");
    let tcp = listen(format!("tcp://127.0.0.1:{}", free_port()));
    let err = refused(
        dir.path(),
        &[tcp.clone(), tls.clone(), vec!["--insecure-listen".into()]].concat(),
    );
    assert!(err.contains("--insecure-listen"), "{err}");
    // A bad file is named with its flag, before anything starts.
    let bad = tls_args(&f.server_cert, &f.server_key, &f.server_key);
    let err = refused(dir.path(), &[tcp, bad].concat());
    assert!(
        err.contains(&format!(
            "--tls-client-ca {}: no PEM CERTIFICATE block",
            f.server_key.display()
        )),
        "{err}"
    );
}
