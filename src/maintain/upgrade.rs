//! Raising a repository to the newest format this build writes.
//!
//! A repository keeps the format `init` gave it, so that the builds that made it keep reading
//! it. Upgrading rewrites only `config.toml`'s `format_version` (atomically): nothing stored
//! changes, and what is written from then on may use the newer format's features (segment
//! deltas since format 3). Builds older than the new format refuse the repository afterwards
//! with a message saying so, rather than finding objects they cannot read.

use serde::Serialize;

use crate::error::Result;
use crate::repo::config::FORMAT_VERSION;
use crate::repo::Repository;

/// What [`upgrade`] did.
#[derive(Debug, Serialize)]
pub struct Upgrade {
    /// The format the repository had.
    pub from: u32,
    /// The format it has now (or would have, in a dry run).
    pub to: u32,
}

impl Upgrade {
    /// True if the format changed (or would change).
    pub fn changed(&self) -> bool {
        self.to != self.from
    }
}

/// Raises `repo` (opened with the exclusive lock, or any lock for a dry run) to
/// [`FORMAT_VERSION`]; a repository already there is left alone.
pub fn upgrade(repo: &Repository, dry_run: bool) -> Result<Upgrade> {
    let from = repo.config().format_version;
    let to = from.max(FORMAT_VERSION);
    if to != from && !dry_run {
        let mut config = repo.config().clone();
        config.format_version = to;
        config.store(repo.backend().as_ref())?;
    }
    Ok(Upgrade { from, to })
}
