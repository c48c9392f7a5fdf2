//! The local environment every cnlb test and the demo run in: the real
//! Kubernetes control plane built from source, real Nodes (containerd and
//! kubelet) running cnlb as users install it, AWS emulators and cnlb's own
//! GCE emulator. All on loopback, on free ports, torn down on drop. See
//! README.md beside this crate.

pub mod aws;
pub mod controlplane;
pub mod env;
pub mod fault_proxy;
pub mod gateway_api;
pub mod images;
pub mod install;
pub mod ipam;
pub mod node;
pub mod onprem;
pub mod paths;
pub mod podnet;
pub mod process;
pub mod range;
pub mod sample_app;
pub mod simulated_kubelet;
pub mod vpc;

/// cnlb's GCE emulator (the `cnlb-gce-emulator` crate), as the harness and
/// the tests have always named it.
pub use cnlb_gce_emulator as gce;

pub use aws::AwsEndpoints;
pub use controlplane::ControlPlane;
pub use env::{Env, EnvBuilder, eventually};
pub use gce::GceEmulator;
pub use node::NodeConfig;
pub use podnet::{AgentBackend, AgentLaunch, PodSandbox};
