//! AWS emulators: moto server (EC2 and ELBv2) and LocalStack in host mode
//! (EC2). Clients reach them only through the standard `AWS_ENDPOINT_URL_*`
//! variables, so product code has no emulator-specific path.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::paths::venv_python;
use crate::process::{Proc, free_port};

/// Region every emulator is addressed in.
pub const REGION: &str = "us-east-1";

/// A user-provided LocalStack that serves ELBv2 (LocalStack Pro): when this
/// variable names its URL, it serves EC2 and ELBv2 and no emulator is started.
pub const EXTERNAL_URL_VAR: &str = "CNLB_LOCALSTACK_URL";

/// Where the AWS APIs of an environment answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsEndpoints {
    pub ec2: String,
    pub elbv2: String,
}

impl AwsEndpoints {
    pub fn single(url: &str) -> AwsEndpoints {
        AwsEndpoints {
            ec2: url.to_string(),
            elbv2: url.to_string(),
        }
    }

    /// The standard AWS SDK environment that points a client at these
    /// endpoints, with static test credentials and IMDS off.
    pub fn env_vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL_EC2", self.ec2.clone()),
            (
                "AWS_ENDPOINT_URL_ELASTIC_LOAD_BALANCING_V2",
                self.elbv2.clone(),
            ),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ACCESS_KEY_ID", "test".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ]
    }
}

/// The user's LocalStack Pro URL, if they set one.
pub fn external_url() -> Option<String> {
    std::env::var(EXTERNAL_URL_VAR)
        .ok()
        .filter(|u| !u.trim().is_empty())
}

pub struct Emulator {
    pub url: String,
    proc: Proc,
    health_path: &'static str,
}

impl Emulator {
    /// `moto_server`, which serves every AWS API it emulates on one port.
    pub fn spawn_moto(dir: &Path) -> Result<Emulator> {
        let port = free_port()?;
        let mut cmd = Command::new(venv_python("moto")?);
        cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(port.to_string());
        Ok(Emulator {
            url: format!("http://127.0.0.1:{port}"),
            proc: Proc::spawn("moto", cmd, dir)?,
            health_path: "/moto-api/data.json",
        })
    }

    /// LocalStack community in host mode (no Docker), EC2 only: its
    /// community build has no ELBv2.
    pub fn spawn_localstack(dir: &Path) -> Result<Emulator> {
        let port = free_port()?;
        let state = dir.join("localstack");
        std::fs::create_dir_all(&state)?;
        let mut cmd = Command::new(venv_python("localstack")?);
        cmd.args(["-m", "localstack.runtime.main"])
            .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("SERVICES", "ec2")
            .env("EAGER_SERVICE_LOADING", "1")
            // It takes any container for its own Docker image and then writes
            // to /var/lib/localstack; host mode keeps everything under `state`.
            .env("OVERRIDE_IN_DOCKER", "0")
            .env("FILESYSTEM_ROOT", &state)
            // No internet here: no DNS server, certificate download or analytics.
            .env("DNS_ADDRESS", "0")
            .env("SKIP_SSL_CERT_DOWNLOAD", "1")
            .env("DISABLE_EVENTS", "1");
        Ok(Emulator {
            url: format!("http://127.0.0.1:{port}"),
            proc: Proc::spawn("localstack", cmd, dir)?,
            health_path: "/_localstack/health",
        })
    }

    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let http = reqwest::Client::new();
        let url = format!("{}{}", self.url, self.health_path);
        self.proc
            .wait_ready(timeout, || async {
                let resp = http.get(&url).send().await?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    bail!("{url}: {}", resp.status())
                }
            })
            .await
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }
}
