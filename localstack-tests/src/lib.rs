//! The local environment every cnlb test and the demo run in: the real
//! Kubernetes control plane built from source, AWS emulators, cnlb's own
//! GCE emulator, and a harness that plays scheduler and kubelet for Pods on
//! the Nodes it creates. All on
//! loopback, on free ports, torn down on drop. See README.md beside this crate.

pub mod aws;
pub mod controlplane;
pub mod env;
pub mod gce;
pub mod ipam;
pub mod kubelet;
pub mod onprem;
pub mod paths;
pub mod podnet;
pub mod process;

pub use aws::AwsEndpoints;
pub use controlplane::ControlPlane;
pub use env::{Env, EnvBuilder, eventually};
pub use gce::GceEmulator;
pub use kubelet::NodeConfig;
pub use podnet::{AgentBackend, AgentLaunch, PodSandbox};
