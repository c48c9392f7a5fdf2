//! A child process of the environment: its own process group (so a part that
//! forks, like LocalStack, goes down whole), output in a log file, readiness
//! checks with a deadline, and a kill on drop so a panicking test leaves nothing.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;

pub struct Proc {
    name: String,
    log: PathBuf,
    /// Also the process group id (`process_group(0)`).
    pid: Pid,
    child: Mutex<Child>,
}

impl Proc {
    /// Starts `cmd` in `log_dir` (also how `cnlb-env down` recognises it later)
    /// with stdout and stderr in `<log_dir>/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Proc> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.current_dir(log_dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        Ok(Proc {
            name: name.to_string(),
            log,
            pid,
            child: Mutex::new(child),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// The exit status, once the process has exited.
    pub fn try_status(&self) -> Result<Option<ExitStatus>> {
        match self.child.lock() {
            Ok(mut c) => Ok(c.try_wait()?),
            Err(_) => bail!("{}: lock poisoned", self.name),
        }
    }

    /// Fails if the process has exited, with its status and the end of its log.
    pub fn check_running(&self) -> Result<()> {
        match self.try_status()? {
            None => Ok(()),
            Some(s) => Err(anyhow!(
                "{} exited ({s}); log: {}\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 20)
            )),
        }
    }

    /// Polls `probe` until it returns Ok, the process exits, or `timeout` passes.
    /// Errors name the part and its log, since that is where the cause is.
    pub async fn wait_ready<F, Fut>(&self, timeout: Duration, mut probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let start = Instant::now();
        let mut last = anyhow!("not probed yet");
        while start.elapsed() < timeout {
            self.check_running()?;
            match probe().await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "{} not ready after {:?}: {last:#}; log: {}\n{}",
            self.name,
            timeout,
            self.log.display(),
            log_tail(&self.log, 20)
        )
    }

    /// SIGTERM to the whole group; returns at once. `Drop` waits and escalates.
    pub fn terminate(&self) {
        let _ = killpg(self.pid, Signal::SIGTERM);
    }

    /// SIGKILL to the group, as a crash would (used by crash tests).
    pub fn kill(&self) {
        let _ = killpg(self.pid, Signal::SIGKILL);
        if let Ok(mut c) = self.child.lock() {
            let _ = c.wait();
        }
    }

    fn wait_exit(&self, grace: Duration) {
        let Ok(mut child) = self.child.lock() else {
            return;
        };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The group, not only the leader: a forked grandchild would outlive it.
        let _ = killpg(self.pid, Signal::SIGKILL);
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
        self.wait_exit(Duration::from_secs(5));
    }
}

/// The stdout of a finished `program args`, or an error with its stderr.
pub fn stdout_of(program: &str, args: &[&str], out: &std::process::Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Stops several processes at once: SIGTERM to all, then wait (and SIGKILL) each.
pub fn stop_all(procs: Vec<Proc>) {
    for p in &procs {
        p.terminate();
    }
    drop(procs);
}

/// The last `n` lines of a log file, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("    | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A free TCP port on 127.0.0.1 (bound, then released for the child to
/// take), chosen at random below the kernel's ephemeral range: a port from
/// that range (what binding port 0 gives) can be taken meanwhile as the
/// source port of any outgoing connection, and the child then fails with
/// "address already in use". Ports handed out by this process are not
/// handed out again.
pub fn free_port() -> Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = ephemeral_low.saturating_sub(12_000).max(1024);
    let span = u64::from(ephemeral_low.saturating_sub(low).max(1));
    for _ in 0..200 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = low + u16::try_from(h.finish() % span).unwrap_or(0);
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// SIGKILL to a process group, then waits (up to 5 s) until its leader is
/// gone. A zombie counts as gone: only its parent can reap it.
pub fn kill_group(pgid: i32) {
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_running(pgid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True if `pid` exists and is not a zombie.
pub fn is_running(pid: i32) -> bool {
    // /proc/<pid>/stat: "pid (comm) state ..."; comm may hold spaces.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Resident memory of a set of processes, in bytes: now and each
/// process's peak (VmHWM) summed, an upper bound of the peak of the whole.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub rss: u64,
    pub peak: u64,
    pub processes: usize,
}

/// The memory of every process in one of the process groups `groups`, or
/// one of `pids`.
pub fn group_memory(groups: &[i32], pids: &[i32]) -> Memory {
    let mut m = Memory::default();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return m;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let pgrp = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(2))
            .and_then(|g| g.parse::<i32>().ok());
        if !pgrp.is_some_and(|g| groups.contains(&g)) && !pids.contains(&pid) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        m.rss += status_kib(&status, "VmRSS:") * 1024;
        m.peak += status_kib(&status, "VmHWM:") * 1024;
        m.processes += 1;
    }
    m
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
