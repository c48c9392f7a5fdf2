//! `vpc-ipam-agent install-cni`: what the DaemonSet's init container runs
//! to put the plugin and the network configuration on the node, so that
//! the image needs no shell. Each file is written under a temporary name
//! and renamed, so the runtime never reads a half-written one, and the
//! configuration goes last: the runtime reports the network ready as soon
//! as it is there.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "vpc-ipam-agent install-cni",
    about = "Installs the vpc-ipam CNI plugin and network configuration on the node"
)]
pub struct InstallArgs {
    /// The plugin binary to install.
    #[arg(long, default_value = "/usr/local/bin/vpc-ipam", value_name = "PATH")]
    pub plugin: PathBuf,
    /// The node's CNI binary directory (mounted from the host).
    #[arg(long, value_name = "DIR")]
    pub cni_bin_dir: PathBuf,
    /// The network configuration to install.
    #[arg(long, value_name = "PATH")]
    pub conflist: PathBuf,
    /// The node's CNI configuration directory (mounted from the host).
    #[arg(long, value_name = "DIR")]
    pub cni_conf_dir: PathBuf,
}

/// Copies the plugin (mode 0755), then the configuration (0644).
pub fn install(args: &InstallArgs) -> Result<(), String> {
    let plugin_name = file_name(&args.plugin, "--plugin")?;
    let conf_name = file_name(&args.conflist, "--conflist")?;
    copy_atomically(&args.plugin, &args.cni_bin_dir.join(plugin_name), 0o755)?;
    copy_atomically(&args.conflist, &args.cni_conf_dir.join(conf_name), 0o644)
}

fn file_name<'a>(path: &'a Path, flag: &str) -> Result<&'a std::ffi::OsStr, String> {
    path.file_name()
        .ok_or_else(|| format!("{flag} {} names no file", path.display()))
}

fn copy_atomically(from: &Path, to: &Path, mode: u32) -> Result<(), String> {
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = to.with_file_name(format!(".{name}.tmp"));
    let step = |e: io::Error, what: &str| format!("{what}: {e}");
    fs::copy(from, &tmp).map_err(|e| {
        step(
            e,
            &format!("copying {} to {}", from.display(), tmp.display()),
        )
    })?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .map_err(|e| step(e, &format!("chmod {}", tmp.display())))?;
    fs::rename(&tmp, to).map_err(|e| {
        step(
            e,
            &format!("renaming {} to {}", tmp.display(), to.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_plugin_and_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&conf).unwrap();
        let plugin = dir.path().join("vpc-ipam");
        let conflist = dir.path().join("10-cnlb.conflist");
        fs::write(&plugin, b"plugin").unwrap();
        fs::write(&conflist, b"{}").unwrap();
        // An older plugin is replaced.
        fs::write(bin.join("vpc-ipam"), b"old").unwrap();
        let args = InstallArgs {
            plugin,
            cni_bin_dir: bin.clone(),
            conflist,
            cni_conf_dir: conf.clone(),
        };
        install(&args).unwrap();
        assert_eq!(fs::read(bin.join("vpc-ipam")).unwrap(), b"plugin");
        let mode = fs::metadata(bin.join("vpc-ipam"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(fs::read(conf.join("10-cnlb.conflist")).unwrap(), b"{}");
        let names: Vec<_> = fs::read_dir(&bin)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["vpc-ipam"], "no temporary file left");

        let missing = InstallArgs {
            cni_bin_dir: dir.path().join("absent"),
            ..args
        };
        let err = install(&missing).unwrap_err();
        assert!(err.contains("absent"), "{err}");
    }
}
