//! The VMware front end: what a VM directory says (the .vmx, the .vmsd snapshot list), which
//! disks and small files an ingest reads from it ([`vm`]), the preflight and `inspect` reports,
//! and datastore relocation on restore.
//!
//! May use: `repo` (manifest types, object limits), `source` (disk readers, the descriptor
//! parser, the confinement rule), and the base modules. Never ingest, maintain or restore.

pub mod inspect;
pub mod preflight;
pub mod relocate;
pub mod vm;

mod disk;
pub mod vmsd;
pub mod vmx;
