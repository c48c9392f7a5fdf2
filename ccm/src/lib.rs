//! Pure parts of cnlb-ccm: no kube client calls and no I/O, so they are unit
//! tested here and shared with the `cnlb-ccm` binary.

pub mod annotations;
pub mod targets;
