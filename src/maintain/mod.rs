//! Keeping a repository healthy: `check` (and the survey of data files against the index that
//! proves the index complete, [`coverage`]), damage reports, `check --repair`, `prune` by
//! retention policy, and `gc`; the one walk of the reference graph they share ([`walk`]).
//!
//! May use: `repo` and the base modules. Never source, vmware, ingest or restore.

pub mod cache;
pub mod check;
pub mod coverage;
pub mod damage;
pub mod describe;
pub mod gc;
pub mod mark;
pub mod prune;
pub mod rebuild;
pub mod repair;
pub mod retention;
pub mod stats;
pub mod walk;
