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
pub mod id_set;
pub mod mark;
pub mod prune;
pub mod rebuild;
pub mod repair;
pub mod retention;
pub mod stats;
pub mod upgrade;
pub mod walk;

/// `default`, or 64 when `VMREPO_TEST_TINY_BATCHES` is set. The sizes that keep memory bounded
/// on large repositories (ids per partition of a live set, index rows per batch of check, live
/// records per wave of a gc rewrite) go through here, so the tests can make a small repository
/// take every path a large one takes.
pub(crate) fn batch(default: u64) -> u64 {
    if std::env::var_os("VMREPO_TEST_TINY_BATCHES").is_some() {
        64
    } else {
        default
    }
}
