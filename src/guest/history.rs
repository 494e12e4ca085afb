//! `vmrepo log`: the generations of a VM in which one guest file changed, oldest first.

use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::guest::diff::differences;
use crate::guest::Guest;
use crate::progress::Progress;
use crate::repo::Repository;

/// A generation in which the file appeared, changed or disappeared.
#[derive(Debug, Serialize)]
pub struct Version {
    /// The generation (`vm@time`).
    pub generation: String,
    /// `added`, `changed` or `removed`.
    pub what: &'static str,
    /// What differs from the version before (empty for `added` and `removed`).
    pub detail: String,
    /// Its size and modification time in this generation (absent when removed).
    pub size: Option<u64>,
    pub mtime: Option<i64>,
}

/// The history of `path` on `volume` over every generation of `vm`.
pub fn history(
    repo: Arc<Repository>,
    vm: &str,
    volume: &str,
    path: &str,
    progress: &dyn Progress,
) -> Result<Vec<Version>> {
    let gens = repo.with_index(|i| i.generations(Some(vm)))?;
    if gens.is_empty() {
        return Err(Error::NotFound(format!("no generations of VM {vm:?}")));
    }
    progress.start(&format!("reading {volume}:{path} in each generation"), 0);
    let mut out = Vec::new();
    let mut last = None;
    for g in &gens {
        let guest = Guest::open(repo.clone(), &g.name)?;
        // A generation without that volume, or whose volume is unreadable, has no such file.
        let now = match guest.find(volume).and_then(|v| guest.filesystem(&v)) {
            Ok(fs) => match fs.stat(path) {
                Ok(e) => Some(e),
                Err(Error::NotFound(_)) => None,
                Err(e) => return Err(e),
            },
            Err(Error::NotFound(_) | Error::Usage(_)) => None,
            Err(e) => return Err(e),
        };
        let change = match (&last, &now) {
            (None, Some(_)) => Some(("added", String::new())),
            (Some(_), None) => Some(("removed", String::new())),
            (Some(a), Some(b)) => {
                let d = differences(a, b);
                (!d.is_empty()).then(|| ("changed", d.join(", ")))
            }
            (None, None) => None,
        };
        if let Some((what, detail)) = change {
            out.push(Version {
                generation: g.name.clone(),
                what,
                detail,
                size: now.as_ref().map(|e| e.size),
                mtime: now.as_ref().map(|e| e.mtime),
            });
        }
        last = now;
        progress.advance(1);
    }
    progress.finish();
    Ok(out)
}
