//! Where the environment's parts live: binaries built by the scripts in
//! `localstack-tests/scripts/`, cached outside the checkout.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

/// The Kubernetes version, as pinned in `controlplane/go.mod` (one source of truth
/// for the build script and for this library).
pub fn kubernetes_version() -> Result<&'static str> {
    const GO_MOD: &str = include_str!("../controlplane/go.mod");
    GO_MOD
        .lines()
        .filter_map(|l| l.trim().strip_prefix("k8s.io/kubernetes "))
        .map(str::trim)
        .next()
        .context("controlplane/go.mod does not require k8s.io/kubernetes")
}

/// `$CNLB_CACHE`, else `$XDG_CACHE_HOME/cnlb`, else `~/.cache/cnlb`, as in the scripts.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CNLB_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache"));
    base.join("cnlb")
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// A Kubernetes binary (etcd, kube-apiserver, kube-controller-manager,
/// kube-scheduler, kubelet, kubectl).
pub fn control_plane_bin(name: &str) -> Result<PathBuf> {
    let path = cache_dir()
        .join("k8s")
        .join(kubernetes_version()?)
        .join("bin")
        .join(name);
    if !path.is_file() {
        bail!(
            "{} is not built; run `make env-deps` (or localstack-tests/scripts/build-control-plane.sh)",
            path.display()
        );
    }
    Ok(path)
}

/// The containerd version, as pinned in `containerd/go.mod`.
pub fn containerd_version() -> Result<&'static str> {
    const GO_MOD: &str = include_str!("../containerd/go.mod");
    GO_MOD
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("require github.com/containerd/containerd/v2 ")
        })
        .map(str::trim)
        .next()
        .context("containerd/go.mod does not require github.com/containerd/containerd/v2")
}

/// A containerd binary (containerd, containerd-shim-runc-v2, ctr).
pub fn containerd_bin(name: &str) -> Result<PathBuf> {
    let path = cache_dir()
        .join("containerd")
        .join(containerd_version()?)
        .join("bin")
        .join(name);
    if !path.is_file() {
        bail!(
            "{} is not built; run `make env-deps` (or localstack-tests/scripts/build-containerd.sh)",
            path.display()
        );
    }
    Ok(path)
}

/// helm, built by `scripts/build-helm.sh` at the version pinned there.
pub fn helm() -> Result<PathBuf> {
    let path = cache_dir().join("helm").join("current").join("helm");
    if !path.is_file() {
        bail!(
            "{} is not built; run `make env-deps` (or localstack-tests/scripts/build-helm.sh)",
            path.display()
        );
    }
    Ok(path)
}

/// The Gateway API CRDs (`standard/` and `experimental/`), fetched by
/// `scripts/fetch-gateway-api.sh` at the version pinned there.
pub fn gateway_api_crds() -> Result<PathBuf> {
    let path = cache_dir().join("gateway-api").join("current").join("crd");
    if !path.join("standard").is_dir() {
        bail!(
            "{} is not fetched; run `make env-deps` (or localstack-tests/scripts/fetch-gateway-api.sh)",
            path.display()
        );
    }
    Ok(path)
}

/// The pinned requirements of each emulator venv, compiled in (so a build
/// never reads another checkout's files).
const PINS: [(&str, &str); 2] = [
    ("moto", include_str!("../pins/moto.txt")),
    ("localstack", include_str!("../pins/localstack.txt")),
];

/// The Python interpreter of an emulator venv (`moto` or `localstack`), checked
/// against the pins in the checkout so a stale venv is reported, not used.
pub fn venv_python(name: &str) -> Result<PathBuf> {
    let dir = cache_dir().join("venv").join(name);
    let want = PINS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, pins)| pins.as_bytes())
        .with_context(|| format!("no pinned requirements for venv {name}"))?;
    match std::fs::read(dir.join(".pins")) {
        Ok(have) if have == want => Ok(dir.join("bin").join("python")),
        Ok(_) => bail!(
            "venv {} is older than localstack-tests/pins/{name}.txt; run `make env-deps` (or localstack-tests/scripts/python-venvs.sh)",
            dir.display()
        ),
        Err(_) => bail!(
            "venv {} is missing; run `make env-deps` (or localstack-tests/scripts/python-venvs.sh)",
            dir.display()
        ),
    }
}

/// A binary of this workspace (`cnlb-ccm`, `vpc-ipam`, ...), from the target
/// directory the running test or tool was built into. `make test` builds
/// them first (`cargo build --workspace --bins`).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    // Tests run from target/<profile>/deps/, tools from target/<profile>/.
    let mut dir = exe.parent().context("executable without a directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps without a parent")?;
    }
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is not built; run `cargo build --workspace --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// Root of the per-environment temp dirs, so `cnlb-env down` can find leftovers.
pub fn run_root() -> PathBuf {
    std::env::temp_dir().join("cnlb-env")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_go_mod() {
        let v = kubernetes_version().unwrap();
        assert!(v.starts_with("v1."), "{v}");
        let v = containerd_version().unwrap();
        assert!(v.starts_with("v2."), "{v}");
    }
}
