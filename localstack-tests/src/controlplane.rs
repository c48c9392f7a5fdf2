//! The real Kubernetes control plane: etcd, kube-apiserver (Node and RBAC
//! authorization, NodeRestriction, static tokens for people and controllers,
//! client certificates from our own CA for kubelets), kube-controller-manager
//! (every default controller, each with its own ServiceAccount credentials,
//! as kubeadm runs it) and kube-scheduler.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::json;

use crate::paths::control_plane_bin;
use crate::process::{Proc, free_port};

/// The service CIDR given to kube-apiserver.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// How the control plane is started.
#[derive(Clone, Debug, Default)]
pub struct ControlPlaneOptions {
    /// With a range, kube-controller-manager gives each Node a /24 of it as
    /// `spec.podCIDR` (`--allocate-node-cidrs`), as on-prem clusters do.
    pub cluster_cidr: Option<String>,
    /// How long a Node may miss heartbeats before it is NotReady
    /// (`--node-monitor-grace-period`; kube-controller-manager's default
    /// otherwise), for tests of what follows.
    pub node_monitor_grace_period: Option<Duration>,
}

pub struct ControlPlane {
    /// `https://127.0.0.1:<port>`
    pub server: String,
    /// Admin kubeconfig (JSON, which kubectl reads as YAML).
    pub kubeconfig: PathBuf,
    pub ca_file: PathBuf,
    etcd_url: String,
    admin: Config,
    /// Signs the kubelets' client and serving certificates.
    ca: CertifiedIssuer<'static, KeyPair>,
    /// Where the parts run, and how etcd and kube-apiserver were started:
    /// [`ControlPlane::start_etcd`] and [`ControlPlane::start_apiserver`]
    /// start them again the same way (same data directory, ports, certificates).
    dir: PathBuf,
    etcd_launch: Launch,
    apiserver_launch: Launch,
    restarts: u32,
    // Field order is drop order: controllers first, etcd last.
    scheduler: Proc,
    kcm: Proc,
    apiserver: Proc,
    etcd: Proc,
}

impl ControlPlane {
    /// Writes certificates, tokens and kubeconfigs into `dir` and starts the
    /// four processes at once; each retries its upstream until it is up.
    pub async fn spawn(dir: &Path, options: &ControlPlaneOptions) -> Result<ControlPlane> {
        let pki = Pki::write(dir)?;
        let admin_token = random_token()?;
        let kcm_token = random_token()?;
        let scheduler_token = random_token()?;
        std::fs::write(
            dir.join("tokens.csv"),
            format!(
                "{admin_token},cnlb-admin,cnlb-admin,\"system:masters\"\n\
                 {kcm_token},system:kube-controller-manager,kube-controller-manager\n\
                 {scheduler_token},system:kube-scheduler,kube-scheduler\n"
            ),
        )?;

        let (etcd_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &server, &pki.ca, "cnlb-admin", &admin_token)?;
        let kcm_kubeconfig = dir.join("kcm.kubeconfig");
        write_kubeconfig(
            &kcm_kubeconfig,
            &server,
            &pki.ca,
            "kube-controller-manager",
            &kcm_token,
        )?;
        let scheduler_kubeconfig = dir.join("scheduler.kubeconfig");
        write_kubeconfig(
            &scheduler_kubeconfig,
            &server,
            &pki.ca,
            "kube-scheduler",
            &scheduler_token,
        )?;

        let mut etcd = Command::new(control_plane_bin("etcd")?);
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        etcd.arg("--name=default")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"))
            .arg("--log-level=warn")
            // Test data is thrown away; fsync would only slow every write.
            .arg("--unsafe-no-fsync");
        let etcd_launch = Launch::of(&etcd);
        let etcd = Proc::spawn("etcd", etcd, dir)?;

        let mut api = Command::new(control_plane_bin("kube-apiserver")?);
        api.arg(format!("--etcd-servers={etcd_url}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={api_port}"))
            .arg(format!("--tls-cert-file={}", pki.apiserver_cert.display()))
            .arg(format!(
                "--tls-private-key-file={}",
                pki.apiserver_key.display()
            ))
            .arg(format!("--client-ca-file={}", pki.ca.display()))
            .arg(format!(
                "--token-auth-file={}",
                dir.join("tokens.csv").display()
            ))
            // Kubelets may touch only their own Node and its Pods.
            .arg("--authorization-mode=Node,RBAC")
            .arg("--enable-admission-plugins=NodeRestriction")
            // As kubeadm and EKS run it: node agents that route (vpc-ipam
            // on AWS) are privileged.
            .arg("--allow-privileged=true")
            // For logs, exec and port-forward, as a kubelet's admin.
            .arg(format!(
                "--kubelet-client-certificate={}",
                pki.kubelet_client_cert.display()
            ))
            .arg(format!(
                "--kubelet-client-key={}",
                pki.kubelet_client_key.display()
            ))
            .arg(format!(
                "--kubelet-certificate-authority={}",
                pki.ca.display()
            ))
            .arg("--anonymous-auth=false")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--service-account-key-file={}",
                pki.sa_pub.display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                pki.sa_key.display()
            ))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            // The `kubernetes` Service would point at a loopback address, which
            // Endpoints validation rejects; nothing here needs it.
            .arg("--endpoint-reconciler-type=none")
            .arg("--profiling=false");
        let apiserver_launch = Launch::of(&api);
        let apiserver = Proc::spawn("kube-apiserver", api, dir)?;

        let mut kcm = Command::new(control_plane_bin("kube-controller-manager")?);
        kcm.arg(format!("--kubeconfig={}", kcm_kubeconfig.display()))
            .arg("--bind-address=127.0.0.1")
            .arg("--secure-port=0")
            .arg("--leader-elect=false")
            .arg("--use-service-account-credentials=true")
            .arg(format!("--root-ca-file={}", pki.ca.display()))
            .arg(format!(
                "--service-account-private-key-file={}",
                pki.sa_key.display()
            ))
            .arg("--controllers=*");
        if let Some(grace) = options.node_monitor_grace_period {
            kcm.arg(format!("--node-monitor-grace-period={}s", grace.as_secs()));
        }
        if let Some(cidr) = &options.cluster_cidr {
            kcm.arg("--allocate-node-cidrs=true")
                .arg(format!("--cluster-cidr={cidr}"))
                .arg("--node-cidr-mask-size=24");
        }
        let kcm = Proc::spawn("kube-controller-manager", kcm, dir)?;

        let mut scheduler = Command::new(control_plane_bin("kube-scheduler")?);
        scheduler
            .arg(format!("--kubeconfig={}", scheduler_kubeconfig.display()))
            .arg("--leader-elect=false")
            // Nothing here reads its metrics or health endpoints.
            .arg("--secure-port=0");
        let scheduler = Proc::spawn("kube-scheduler", scheduler, dir)?;

        let admin = client_config(&kubeconfig).await?;
        Ok(ControlPlane {
            server,
            kubeconfig,
            ca_file: pki.ca,
            etcd_url,
            admin,
            ca: pki.issuer,
            dir: dir.to_path_buf(),
            etcd_launch,
            apiserver_launch,
            restarts: 0,
            scheduler,
            kcm,
            apiserver,
            etcd,
        })
    }

    /// Waits for etcd, then the API server's /readyz, then for the controller
    /// manager to act (the `default` ServiceAccount exists, so Pods can be created).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        self.wait_etcd(timeout).await?;
        self.wait_apiserver(timeout).await?;
        let client = self.admin_client()?;
        let sas: Api<ServiceAccount> = Api::namespaced(client, "default");
        self.kcm
            .wait_ready(timeout, || async {
                sas.get("default").await?;
                Ok(())
            })
            .await?;
        // It serves nothing to probe; it schedules once the API answers.
        self.scheduler.check_running()
    }

    pub fn procs(&self) -> [&Proc; 4] {
        [&self.scheduler, &self.kcm, &self.apiserver, &self.etcd]
    }

    async fn wait_etcd(&self, timeout: Duration) -> Result<()> {
        let http = reqwest::Client::new();
        let health = format!("{}/health", self.etcd_url);
        self.etcd
            .wait_ready(timeout, || async {
                let body = http.get(&health).send().await?.text().await?;
                if body.contains("\"health\":\"true\"") {
                    Ok(())
                } else {
                    bail!("etcd: {body}")
                }
            })
            .await
    }

    async fn wait_apiserver(&self, timeout: Duration) -> Result<()> {
        let client = self.admin_client()?;
        self.apiserver
            .wait_ready(timeout, || async {
                let req = http::Request::get("/readyz").body(Vec::new())?;
                let body = client.request_text(req).await?;
                if body.trim() == "ok" {
                    Ok(())
                } else {
                    bail!("readyz: {body}")
                }
            })
            .await
    }

    /// Kills etcd with SIGKILL, as a crash would; [`ControlPlane::start_etcd`]
    /// starts it again.
    pub fn kill_etcd(&self) {
        self.etcd.kill();
    }

    /// Kills kube-apiserver with SIGKILL: every open connection (watches
    /// included) breaks; [`ControlPlane::start_apiserver`] starts it again.
    pub fn kill_apiserver(&self) {
        self.apiserver.kill();
    }

    /// Starts etcd again, after [`ControlPlane::kill_etcd`], on its data
    /// directory and ports, and waits until it is healthy.
    pub async fn start_etcd(&mut self, timeout: Duration) -> Result<()> {
        self.restarts += 1;
        self.etcd = relaunch(&self.dir, self.restarts, &self.etcd, &self.etcd_launch)?;
        self.wait_etcd(timeout).await
    }

    /// Starts kube-apiserver again, after [`ControlPlane::kill_apiserver`],
    /// with the same flags (port, certificates, tokens, etcd), and waits for
    /// its /readyz. Its watch cache starts empty, from etcd's current revision.
    pub async fn start_apiserver(&mut self, timeout: Duration) -> Result<()> {
        self.restarts += 1;
        self.apiserver = relaunch(
            &self.dir,
            self.restarts,
            &self.apiserver,
            &self.apiserver_launch,
        )?;
        self.wait_apiserver(timeout).await
    }

    /// Compacts etcd's history up to its current revision, as
    /// kube-apiserver does every 5 minutes, through etcd's HTTP/JSON gateway:
    /// afterwards a watch from any older resourceVersion that reaches etcd
    /// is answered 410 Gone. Returns the revision.
    pub async fn compact_etcd(&self) -> Result<i64> {
        let http = reqwest::Client::new();
        let post = |path: &str, body: serde_json::Value| {
            http.post(format!("{}{path}", self.etcd_url))
                .body(body.to_string())
                .send()
        };
        // Any read answers with the store's revision; "Lw==" is the key "/".
        let range = post("/v3/kv/range", json!({"key": "Lw==", "count_only": true}))
            .await?
            .error_for_status()?
            .text()
            .await?;
        let range: serde_json::Value = serde_json::from_str(&range)?;
        // int64 fields are JSON strings in the gateway's answers.
        let revision: i64 = range["header"]["revision"]
            .as_str()
            .context("no revision in etcd's answer")?
            .parse()?;
        post(
            "/v3/kv/compaction",
            json!({"revision": revision, "physical": true}),
        )
        .await?
        .error_for_status()?;
        Ok(revision)
    }

    /// A client certificate (PEM certificate, PEM key) of user `cn` in
    /// groups `orgs`, signed by the cluster's CA.
    pub fn client_certificate(&self, cn: &str, orgs: &[&str]) -> Result<(String, String)> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        for o in orgs {
            params.distinguished_name.push(DnType::OrganizationName, *o);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes `<dir>/kubelet.kubeconfig`, with which a kubelet acts as Node
    /// `node` (`system:node:<node>` in `system:nodes`: what the Node
    /// authorizer and NodeRestriction recognise), and returns its path.
    pub fn node_kubeconfig(&self, dir: &Path, node: &str) -> Result<PathBuf> {
        let (cert, key) =
            self.client_certificate(&format!("system:node:{node}"), &["system:nodes"])?;
        let (cert_file, key_file) = (
            dir.join("kubelet-client.crt"),
            dir.join("kubelet-client.key"),
        );
        std::fs::write(&cert_file, cert)?;
        std::fs::write(&key_file, key)?;
        let path = dir.join("kubelet.kubeconfig");
        write_kubeconfig_for(
            &path,
            &self.server,
            &self.ca_file,
            &format!("system:node:{node}"),
            json!({"client-certificate": cert_file, "client-key": key_file}),
        )?;
        Ok(path)
    }

    /// A serving certificate (PEM certificate, PEM key) for `names` (DNS
    /// names or IP addresses), signed by the cluster's CA.
    pub fn serving_certificate(&self, cn: &str, names: &[String]) -> Result<(String, String)> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A client with cluster-admin rights (group `system:masters`).
    pub fn admin_client(&self) -> Result<Client> {
        Ok(Client::try_from(self.admin.clone())?)
    }

    /// A client that acts as ServiceAccount `namespace/name`, through
    /// impersonation, so RBAC applies to it exactly as to a Pod using that account.
    pub fn service_account_client(&self, namespace: &str, name: &str) -> Result<Client> {
        let mut cfg = self.admin.clone();
        cfg.auth_info.impersonate = Some(format!("system:serviceaccount:{namespace}:{name}"));
        cfg.auth_info.impersonate_groups = Some(vec![
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{namespace}"),
            "system:authenticated".to_string(),
        ]);
        Ok(Client::try_from(cfg)?)
    }
}

/// Loads a kubeconfig file the way any client of the environment would.
pub async fn client_config(kubeconfig: &Path) -> Result<Config> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    Ok(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, user: &str, token: &str) -> Result<()> {
    write_kubeconfig_for(path, server, ca, user, json!({"token": token}))
}

/// A kubeconfig for `server` whose user authenticates as `credentials`
/// (a kubeconfig `user` object).
fn write_kubeconfig_for(
    path: &Path,
    server: &str,
    ca: &Path,
    user: &str,
    credentials: serde_json::Value,
) -> Result<()> {
    let kc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cnlb-env", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "cnlb-env", "context": {"cluster": "cnlb-env", "user": user}}],
        "current-context": "cnlb-env",
    });
    std::fs::write(path, serde_json::to_vec_pretty(&kc)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// A program and its arguments, to start it again.
struct Launch {
    program: OsString,
    args: Vec<OsString>,
}

impl Launch {
    fn of(cmd: &Command) -> Launch {
        Launch {
            program: cmd.get_program().to_owned(),
            args: cmd.get_args().map(ToOwned::to_owned).collect(),
        }
    }
}

/// `launch` again, in place of `old` (which must have exited), logging to
/// `<name>.<n>.log` so the earlier log is kept; recorded for `cnlb-env down`.
fn relaunch(dir: &Path, n: u32, old: &Proc, launch: &Launch) -> Result<Proc> {
    if old.try_status()?.is_none() {
        bail!("{} is still running", old.name());
    }
    let base = old.name().split('.').next().unwrap_or(old.name());
    let mut cmd = Command::new(&launch.program);
    cmd.args(&launch.args);
    let proc = Proc::spawn(&format!("{base}.{n}"), cmd, dir)?;
    crate::env::record_pid(dir, &proc)?;
    Ok(proc)
}

fn random_token() -> Result<String> {
    let mut buf = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The environment's own CA, the API server's serving certificate, its
/// client certificate towards kubelets, and the ServiceAccount token
/// signing key.
struct Pki {
    issuer: CertifiedIssuer<'static, KeyPair>,
    ca: PathBuf,
    apiserver_cert: PathBuf,
    apiserver_key: PathBuf,
    kubelet_client_cert: PathBuf,
    kubelet_client_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

impl Pki {
    fn write(dir: &Path) -> Result<Pki> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "cnlb-env CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default.svc".to_string(),
        ])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &ca)?;

        let client_key = KeyPair::generate()?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver-kubelet-client");
        client
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client.signed_by(&client_key, &ca)?;

        let sa = KeyPair::generate()?;
        let pki = Pki {
            ca: dir.join("ca.crt"),
            apiserver_cert: dir.join("apiserver.crt"),
            apiserver_key: dir.join("apiserver.key"),
            kubelet_client_cert: dir.join("apiserver-kubelet-client.crt"),
            kubelet_client_key: dir.join("apiserver-kubelet-client.key"),
            sa_key: dir.join("sa.key"),
            sa_pub: dir.join("sa.pub"),
            issuer: ca,
        };
        std::fs::write(&pki.ca, pki.issuer.pem())?;
        std::fs::write(&pki.apiserver_cert, cert.pem())?;
        std::fs::write(&pki.apiserver_key, key.serialize_pem())?;
        std::fs::write(&pki.kubelet_client_cert, client_cert.pem())?;
        std::fs::write(&pki.kubelet_client_key, client_key.serialize_pem())?;
        std::fs::write(&pki.sa_key, sa.serialize_pem())?;
        std::fs::write(&pki.sa_pub, sa.public_key_pem())?;
        Ok(pki)
    }
}
