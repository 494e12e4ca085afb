//! Agentless backup of VMs on an ESXi host or a vCenter Server through the vSphere API, the
//! way vcbMounter did it: log in over HTTPS, take a snapshot, read the frozen disks and the
//! VM's files from the datastore over HTTPS, and always remove the snapshot again.
//!
//! The VM's small files are copied into a private staging directory laid out like
//! `/vmfs/volumes`; each disk data file is a placeholder there whose bytes are read by range
//! from the host ([`datastore::DatastoreFile`]). The ordinary VM-directory reader then reads the
//! staged VM, with the disks the host's snapshot froze ([`crate::vmware::vm::StagedVm`]).

pub mod api;
pub mod datastore;
pub mod frozen;
pub mod inventory;
mod soap;
pub mod tls;
pub mod url;
mod xml;

pub use frozen::{Connect, FrozenVm, SNAPSHOT_PREFIX};
pub use url::{is_vsphere, SourceUrl};
