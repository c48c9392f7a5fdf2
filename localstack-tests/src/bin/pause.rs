//! `cnlb-pause`: the process of every Pod sandbox on the local environment's
//! Nodes (containerd's sandbox image), as Kubernetes' own pause: it holds
//! the Pod's namespaces, reaps the orphans it inherits, and exits on SIGINT
//! or SIGTERM.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

fn main() {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGCHLD] {
        set.add(s);
    }
    if let Err(e) = set.thread_block() {
        eprintln!("cnlb-pause: blocking signals: {e}");
        std::process::exit(1);
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    if status == WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => std::process::exit(0),
            Err(_) => {}
        }
    }
}
