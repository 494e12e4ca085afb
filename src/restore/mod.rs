//! Reading generations back: the read path from chunks to a verified disk image ([`reader`]),
//! `extract` into a directory, the FUSE mount, the NBD server, the disk-image writers, and the
//! no-follow file creation every destination write goes through ([`safe_fs`]).
//!
//! May use: `repo`, `source` (descriptor text for written disks), `vmware` (placing disks
//! under their .vmx, relocation), `maintain` (damage reports) and the base modules. Never
//! ingest.

pub mod extract;
pub mod log;
pub mod mount;
pub mod nbd;
pub mod placement;
pub mod reader;
pub mod safe_fs;
pub mod writer;
