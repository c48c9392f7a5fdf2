//! HAProxy's runtime API (the admin `stats socket`) and master CLI: one
//! command per connection, command text built and replies parsed by pure
//! functions, so everything but the socket I/O is unit-tested.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use cnlb_provider_core::{ProviderError, Result, TargetHealthState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Deadline of one runtime API command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A unix socket speaking the HAProxy CLI (the worker's admin socket or the
/// master socket).
#[derive(Debug, Clone)]
pub struct Cli {
    socket: PathBuf,
}

impl Cli {
    pub fn new(socket: impl Into<PathBuf>) -> Cli {
        Cli {
            socket: socket.into(),
        }
    }

    /// Runs `command` and returns HAProxy's reply. An unreachable socket is
    /// a retryable error: HAProxy is (re)starting or down.
    pub async fn run(&self, command: &str) -> Result<String> {
        let unreachable = |e: std::io::Error| {
            ProviderError::cloud(
                verb(command),
                format!("HAProxy CLI {} unreachable: {e}", self.socket.display()),
                true,
            )
        };
        let exchange = async {
            let mut stream = UnixStream::connect(&self.socket).await?;
            stream.write_all(format!("{command}\n").as_bytes()).await?;
            // The master CLI answers only once the client stops writing.
            stream.shutdown().await?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply).await?;
            Ok::<_, std::io::Error>(reply)
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, exchange).await {
            Ok(reply) => reply.map_err(unreachable),
            Err(_) => Err(ProviderError::cloud(
                verb(command),
                format!("HAProxy CLI {} did not answer", self.socket.display()),
                true,
            )),
        }
    }

    /// The worker's process ID (`show info`), which changes on a reload.
    pub async fn worker_pid(&self) -> Result<u32> {
        let info = self.run("show info").await?;
        parse_pid(&info)
            .ok_or_else(|| ProviderError::cloud("show info", format!("no Pid in {info:?}"), true))
    }
}

/// The first two words of a command, for error messages and metrics.
pub fn verb(command: &str) -> String {
    command
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn add_server(backend: &str, server: &str, addr: &str, args: &str) -> String {
    format!("add server {backend}/{server} {addr} {args}")
}

pub fn enable_health(backend: &str, server: &str) -> String {
    format!("enable health {backend}/{server}")
}

/// Administrative server state for `set server ... state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    Ready,
    Drain,
    Maint,
}

pub fn set_server_state(backend: &str, server: &str, state: AdminState) -> String {
    let state = match state {
        AdminState::Ready => "ready",
        AdminState::Drain => "drain",
        AdminState::Maint => "maint",
    };
    format!("set server {backend}/{server} state {state}")
}

pub fn shutdown_sessions(backend: &str, server: &str) -> String {
    format!("shutdown sessions server {backend}/{server}")
}

pub fn del_server(backend: &str, server: &str) -> String {
    format!("del server {backend}/{server}")
}

pub fn show_servers_state(backend: &str) -> String {
    format!("show servers state {backend}")
}

/// Current sessions per server of `backend` (`show stat`, servers only).
pub fn show_stat(backend: &str) -> String {
    format!("show stat {backend} 4 -1")
}

/// What a command's reply means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Done,
    /// The server (or its backend) does not exist.
    NoSuchServer,
    NoSuchBackend,
    /// `add server` of a name that exists.
    AlreadyExists,
    /// `del server` of a server that still has connections.
    InUse,
    Failed(String),
}

/// Reads the reply of `add server`, `del server`, `set server`,
/// `enable health` and `shutdown sessions`: success is an empty reply or
/// a known confirmation; anything else is an error message.
pub fn parse_reply(reply: &str) -> Reply {
    let text = reply.trim();
    match text {
        "" | "New server registered." | "Server deleted." => Reply::Done,
        "No such server." => Reply::NoSuchServer,
        "No such backend." => Reply::NoSuchBackend,
        _ if text.starts_with("Already exists a server") => Reply::AlreadyExists,
        _ if text.contains("still has connections")
            || text.contains("Only servers in maintenance mode") =>
        {
            Reply::InUse
        }
        _ => Reply::Failed(text.to_string()),
    }
}

/// One line of `show servers state` (format version 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    pub backend: String,
    pub name: String,
    pub addr: SocketAddr,
    /// 0 stopped, 1 starting, 2 running, 3 stopping.
    pub op_state: u32,
    /// Bit field: maintenance and drain flags.
    pub admin_state: u32,
    pub seconds_since_change: u64,
    /// HAProxy's check status code (e.g. 15 L7OK, 8 L4CON, 17 L7STS).
    pub check_status: u32,
    /// 0 unknown, 1 neutral, 2 failed, 3 passed, 4 conditionally passed.
    pub check_result: u32,
}

const ADMIN_MAINT: u32 = 0x01 | 0x02 | 0x04 | 0x20 | 0x40;
const ADMIN_DRAIN: u32 = 0x08 | 0x10;
const OP_RUNNING: u32 = 2;
const CHECK_FAILED: u32 = 2;
const CHECK_PASSED: u32 = 3;
const CHECK_CONDPASS: u32 = 4;

impl ServerState {
    pub fn in_maintenance(&self) -> bool {
        self.admin_state & ADMIN_MAINT != 0
    }

    pub fn draining(&self) -> bool {
        self.admin_state & ADMIN_DRAIN != 0
    }

    /// The health the controller sees. `registered`: the provider wants
    /// the server to get traffic; one it does not want is draining (or,
    /// once in maintenance, about to be deleted).
    pub fn health(&self, registered: bool) -> (TargetHealthState, Option<String>) {
        if !registered || self.draining() {
            return (TargetHealthState::Draining, None);
        }
        if self.in_maintenance() {
            return (TargetHealthState::Unavailable, Some("maintenance".into()));
        }
        let reason = Some(check_status_name(self.check_status).to_string());
        match (self.op_state, self.check_result) {
            (OP_RUNNING, CHECK_PASSED | CHECK_CONDPASS) => (TargetHealthState::Healthy, None),
            (OP_RUNNING, CHECK_FAILED) => (TargetHealthState::Unhealthy, reason),
            (OP_RUNNING, _) => (TargetHealthState::Initial, None),
            _ if self.check_result == 0 => (TargetHealthState::Initial, None),
            _ => (TargetHealthState::Unhealthy, reason),
        }
    }
}

/// HAProxy's names for the check status codes of `show servers state`
/// (`HCHK_STATUS_*` in its check-t.h).
fn check_status_name(code: u32) -> &'static str {
    const NAMES: [&str; 18] = [
        "UNK", "INI", "START", "CHECKED", "HANA", "SOCKERR", "L4OK", "L4TOUT", "L4CON", "L6OK",
        "L6TOUT", "L6RSP", "L7TOUT", "L7RSP", "L57DATA", "L7OK", "L7OKC", "L7STS",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// Parses `show servers state` by its header, so added columns in later
/// versions do not matter.
pub fn parse_servers_state(reply: &str) -> Result<Vec<ServerState>> {
    let bad = |what: String| ProviderError::cloud("show servers state", what, true);
    let mut lines = reply.lines().filter(|l| !l.trim().is_empty());
    match lines.next().map(str::trim) {
        Some("1") => {}
        // An unknown backend answers with an error message instead.
        Some(other) => return Err(bad(format!("unexpected reply: {other}"))),
        None => return Ok(Vec::new()),
    }
    let header: Vec<&str> = lines
        .next()
        .and_then(|h| h.strip_prefix('#'))
        .ok_or_else(|| bad("no header line".into()))?
        .split_whitespace()
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| bad(format!("no {name} column")))
    };
    let cols = [
        col("be_name")?,
        col("srv_name")?,
        col("srv_addr")?,
        col("srv_port")?,
        col("srv_op_state")?,
        col("srv_admin_state")?,
        col("srv_time_since_last_change")?,
        col("srv_check_status")?,
        col("srv_check_result")?,
    ];
    lines
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let get = |i: usize| {
                fields
                    .get(cols[i])
                    .copied()
                    .ok_or_else(|| bad(format!("short line {line:?}")))
            };
            let num = |i: usize| {
                get(i)?
                    .parse::<u64>()
                    .map_err(|_| bad(format!("bad number in {line:?}")))
            };
            let small = |i: usize| num(i).map(|n| u32::try_from(n).unwrap_or(u32::MAX));
            let ip: IpAddr = get(2)?
                .parse()
                .map_err(|_| bad(format!("bad address in {line:?}")))?;
            let port = u16::try_from(num(3)?).map_err(|_| bad(format!("bad port in {line:?}")))?;
            Ok(ServerState {
                backend: get(0)?.to_string(),
                name: get(1)?.to_string(),
                addr: SocketAddr::new(ip, port),
                op_state: small(4)?,
                admin_state: small(5)?,
                seconds_since_change: num(6)?,
                check_status: small(7)?,
                check_result: small(8)?,
            })
        })
        .collect()
}

/// Current sessions (`scur`) per server name from `show stat` CSV.
pub fn parse_sessions(reply: &str) -> BTreeMap<String, u64> {
    let mut lines = reply.lines();
    let Some(header) = lines.next().and_then(|h| h.strip_prefix("# ")) else {
        return BTreeMap::new();
    };
    let header: Vec<&str> = header.split(',').collect();
    let (Some(sv), Some(scur)) = (
        header.iter().position(|h| *h == "svname"),
        header.iter().position(|h| *h == "scur"),
    ) else {
        return BTreeMap::new();
    };
    lines
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            let name = fields.get(sv)?;
            let sessions = fields.get(scur)?.parse().ok()?;
            Some((name.to_string(), sessions))
        })
        .collect()
}

/// `Pid: N` of `show info`.
pub fn parse_pid(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|p| p.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from HAProxy 2.6.12: a static server whose check fails, a
    // dynamic one that passed its HTTP check, one draining, one just added
    // (maintenance).
    const STATE: &str = "1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port
3 be1 1 pod-127.0.9.10-9000 127.0.9.10 0 0 1 1 6 8 2 0 6 0 0 0 - 9000 - 0 0 - - 0
3 be1 2 pod-127.0.9.11-9001 127.0.9.11 2 0 1 1 4 15 3 2 6 0 0 0 - 9001 - 0 0 - - 0
3 be1 3 pod-127.0.9.12-9001 127.0.9.12 2 8 1 1 0 15 3 2 6 0 0 0 - 9001 - 0 0 - - 0
3 be1 4 pod-127.0.9.13-9001 127.0.9.13 0 1 1 1 0 1 0 0 2 0 0 0 - 9001 - 0 0 - - 0
3 be1 5 pod-127.0.9.14-9001 127.0.9.14 2 0 1 1 1 1 0 2 6 0 0 0 - 9001 - 0 0 - - 0
";

    #[test]
    fn commands() {
        assert_eq!(
            add_server("b", "pod-10.0.0.1-80", "10.0.0.1:80", "check inter 1000ms"),
            "add server b/pod-10.0.0.1-80 10.0.0.1:80 check inter 1000ms"
        );
        assert_eq!(
            set_server_state("b", "s", AdminState::Drain),
            "set server b/s state drain"
        );
        assert_eq!(
            set_server_state("b", "s", AdminState::Ready),
            "set server b/s state ready"
        );
        assert_eq!(
            set_server_state("b", "s", AdminState::Maint),
            "set server b/s state maint"
        );
        assert_eq!(enable_health("b", "s"), "enable health b/s");
        assert_eq!(del_server("b", "s"), "del server b/s");
        assert_eq!(shutdown_sessions("b", "s"), "shutdown sessions server b/s");
        assert_eq!(show_servers_state("b"), "show servers state b");
        assert_eq!(show_stat("b"), "show stat b 4 -1");
        assert_eq!(verb("add server b/s 1.2.3.4:5"), "add server");
    }

    #[test]
    fn replies() {
        assert_eq!(parse_reply("New server registered.\n\n"), Reply::Done);
        assert_eq!(parse_reply("\n"), Reply::Done);
        assert_eq!(parse_reply("Server deleted."), Reply::Done);
        assert_eq!(parse_reply("No such server.\n"), Reply::NoSuchServer);
        assert_eq!(parse_reply("No such backend.\n"), Reply::NoSuchBackend);
        assert_eq!(
            parse_reply("Already exists a server with the same name in backend.\n"),
            Reply::AlreadyExists
        );
        assert_eq!(
            parse_reply("Only servers in maintenance mode can be deleted."),
            Reply::InUse
        );
        assert_eq!(
            parse_reply("Server still has connections attached to it, cannot remove it."),
            Reply::InUse
        );
        assert_eq!(
            parse_reply("'enable health' only applies to servers with checks."),
            Reply::Failed("'enable health' only applies to servers with checks.".into())
        );
    }

    #[test]
    fn servers_state_and_health() {
        let servers = parse_servers_state(STATE).unwrap();
        assert_eq!(servers.len(), 5);
        assert_eq!(servers[0].backend, "be1");
        assert_eq!(servers[0].name, "pod-127.0.9.10-9000");
        assert_eq!(servers[0].addr, "127.0.9.10:9000".parse().unwrap());
        assert_eq!(servers[1].seconds_since_change, 4);
        let health: Vec<_> = servers.iter().map(|s| s.health(true)).collect();
        assert_eq!(
            health,
            [
                (TargetHealthState::Unhealthy, Some("L4CON".into())),
                (TargetHealthState::Healthy, None),
                (TargetHealthState::Draining, None),
                (TargetHealthState::Unavailable, Some("maintenance".into())),
                (TargetHealthState::Initial, None),
            ]
        );
        assert!(servers[2].draining() && !servers[2].in_maintenance());
        assert!(servers[3].in_maintenance());
        // A server the provider no longer wants is draining whatever HAProxy says.
        assert_eq!(servers[1].health(false).0, TargetHealthState::Draining);

        assert!(parse_servers_state("").unwrap().is_empty());
        assert!(parse_servers_state("Can't find backend.\n").is_err());
        assert!(parse_servers_state("1\n# be_name\n").is_err());
    }

    #[test]
    fn sessions_and_pid() {
        let stat = "# pxname,svname,qcur,qmax,scur,smax,slim,stot\n\
                    be1,pod-a,0,0,3,4,,9\n\
                    be1,pod-b,0,0,0,0,,0\n";
        let sessions = parse_sessions(stat);
        assert_eq!(sessions["pod-a"], 3);
        assert_eq!(sessions["pod-b"], 0);
        assert!(parse_sessions("No such backend.").is_empty());
        assert_eq!(
            parse_pid("Name: HAProxy\nPid: 14300\nUptime: 0d\n"),
            Some(14300)
        );
        assert_eq!(parse_pid("Unknown command"), None);
    }
}
