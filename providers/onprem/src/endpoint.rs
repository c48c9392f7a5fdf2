//! Where a plugin listens: a unix socket (the default, CSI style) or TCP.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// A plugin's address, written `unix:///run/cnlb/plugin.sock` (or a bare
/// absolute path) or `tcp://127.0.0.1:50051`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginEndpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl FromStr for PluginEndpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if !path.starts_with('/') {
                return Err(format!("{s:?}: the socket path must be absolute"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') {
            return Ok(Self::Unix(PathBuf::from(s)));
        }
        let addr = s.strip_prefix("tcp://").unwrap_or(s);
        addr.parse()
            .map(Self::Tcp)
            .map_err(|_| format!("{s:?} is neither unix:///path/to.sock nor tcp://<ip>:<port>"))
    }
}

impl fmt::Display for PluginEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let unix = PluginEndpoint::Unix("/run/cnlb/p.sock".into());
        for s in [
            "unix:///run/cnlb/p.sock",
            "unix:/run/cnlb/p.sock",
            "/run/cnlb/p.sock",
        ] {
            assert_eq!(s.parse::<PluginEndpoint>(), Ok(unix.clone()), "{s}");
        }
        assert_eq!(unix.to_string(), "unix:///run/cnlb/p.sock");
        let tcp = PluginEndpoint::Tcp("127.0.0.1:50051".parse().unwrap());
        assert_eq!("tcp://127.0.0.1:50051".parse(), Ok(tcp.clone()));
        assert_eq!(
            "[::1]:50051".parse::<PluginEndpoint>().unwrap().to_string(),
            "tcp://[::1]:50051"
        );
        assert!("unix://relative.sock".parse::<PluginEndpoint>().is_err());
        assert!("tcp://plugin:50051".parse::<PluginEndpoint>().is_err());
    }
}
