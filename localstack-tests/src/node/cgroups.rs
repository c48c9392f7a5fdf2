//! A real Node's cgroup, `cnlb-<k>-<node>`, in every cgroup v1 hierarchy
//! of the host (the machine has no cgroup v2 controllers). The kubelet puts
//! its Pods under it (`cgroupRoot`); its own processes (mount namespace
//! holder, containerd, the kubelet, and the shims containerd starts) join
//! `<cgroup>/system` in the pids and memory hierarchies. So every process
//! of a Node is in one subtree of the pids hierarchy: that is how it is
//! stopped, also when its owner died, and measured.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const ROOT: &str = "/sys/fs/cgroup";
/// The hierarchies the Node's own processes join.
pub const SYSTEM_HIERARCHIES: [&str; 2] = ["pids", "memory"];

/// The mounted v1 hierarchies (`cpu`, `memory`, `pids`, ...), not cgroup v2.
fn hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(ROOT) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").is_file() && !p.join("cgroup.controllers").exists())
        .collect();
    dirs.sort();
    dirs
}

/// Creates `name` in every hierarchy (cpuset's with its parent's CPUs and
/// memory nodes, without which no task may join) and `name/system` in the
/// hierarchies of [`SYSTEM_HIERARCHIES`].
pub fn create(name: &str) -> Result<()> {
    for h in hierarchies() {
        let dir = h.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if h.ends_with("cpuset") {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let value = std::fs::read_to_string(h.join(file))?;
                std::fs::write(dir.join(file), value.trim())
                    .with_context(|| format!("writing {}", dir.join(file).display()))?;
            }
        }
    }
    for h in SYSTEM_HIERARCHIES {
        std::fs::create_dir_all(Path::new(ROOT).join(h).join(name).join("system"))?;
    }
    Ok(())
}

/// A shell snippet that moves the shell (`$$`) into `name/system`, to run
/// before it execs a Node's process.
pub fn join_script(name: &str) -> String {
    SYSTEM_HIERARCHIES
        .iter()
        .map(|h| format!("echo $$ > {ROOT}/{h}/{name}/system/cgroup.procs"))
        .collect::<Vec<_>>()
        .join(" && ")
}

/// Every process in `name`'s subtree of the pids hierarchy.
pub fn pids(name: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    collect_pids(&Path::new(ROOT).join("pids").join(name), &mut pids);
    pids
}

fn collect_pids(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&e.path(), out);
            }
        }
    }
}

/// SIGKILL to every process of `name`'s subtree until none is left (5 s
/// at most: a process that forks meanwhile is caught by the next round).
pub fn kill_all(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = pids(name);
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes `name` and everything below it from every hierarchy (each must
/// be empty of processes: see [`kill_all`]).
pub fn remove(name: &str) {
    for h in hierarchies() {
        remove_tree(&h.join(name));
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    // A cgroup directory goes with rmdir, its files with it.
    let _ = std::fs::remove_dir(dir);
}

/// The Node cgroups on this host whose names start with `prefix`.
pub fn with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(Path::new(ROOT).join("pids")) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}
