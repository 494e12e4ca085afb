//! What every command shares: how long to wait for the repository's lock, the interrupt token, and where the passphrase of an encrypted repository comes from (asked at most once).

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;

use vmrepo::backend::RemoteOptions;
use vmrepo::ingest::hooks::Interrupt;
use vmrepo::ingest::SegmentWorkers;
use vmrepo::progress::Progress;
use vmrepo::repo::lock::LockMode;
use vmrepo::Repository;
use zeroize::Zeroizing;

use crate::cli::output::Bar;
use crate::cli::passphrase::Source;

/// The global options, as the commands use them.
pub struct Context {
    /// `--lock-wait`: seconds to wait for other vmrepo processes to release the repository.
    pub lock_wait: u64,
    /// The interrupt token the signal thread holds too: ingests run their hooks under it.
    pub interrupt: Interrupt,
    /// The threads that read and cut segments (`--threads`), shared by every ingest of the run.
    pub workers: SegmentWorkers,
    /// Repositories in object storage: `--cache-dir` (where the index is cached),
    /// `--limit-upload`, `--limit-download`.
    pub remote: RemoteOptions,
    passphrase: Source,
    /// The passphrase once asked for (a prompt is shown at most once per run).
    passphrase_value: Mutex<Option<Zeroizing<String>>>,
}

impl Context {
    pub fn new(
        lock_wait: u64,
        interrupt: Interrupt,
        workers: SegmentWorkers,
        remote: RemoteOptions,
        passphrase: Source,
    ) -> Context {
        Context {
            lock_wait,
            interrupt,
            workers,
            remote,
            passphrase,
            passphrase_value: Mutex::new(None),
        }
    }

    /// Where the passphrase comes from (`--password-file`, `--password-command`,
    /// VMREPO_PASSWORD or a prompt).
    pub fn passphrase_source(&self) -> Source {
        self.passphrase.clone()
    }

    /// The passphrase of the repository being opened, asked for at most once.
    pub fn passphrase(&self) -> anyhow::Result<Zeroizing<String>> {
        let mut cached = self.passphrase_value.lock().unwrap();
        if let Some(p) = cached.as_ref() {
            return Ok(p.clone());
        }
        let p = self.passphrase.get(false)?;
        *cached = Some(p.clone());
        Ok(p)
    }

    /// Opens a repository, waiting up to `--lock-wait` seconds for its lock (saying so on
    /// stderr).
    pub fn open_repo(&self, path: &Path, mode: LockMode, bar: &Bar) -> anyhow::Result<Repository> {
        self.open_repo_waiting(path, mode, self.lock_wait, bar)
    }

    /// [`Context::open_repo`] with another lock wait (a job file may set a longer one).
    pub fn open_repo_waiting(
        &self,
        path: &Path,
        mode: LockMode,
        lock_wait: u64,
        bar: &Bar,
    ) -> anyhow::Result<Repository> {
        self.open_with_passphrase(path, mode, lock_wait, &|| self.passphrase(), bar)
    }

    /// Opens a repository for a shell completion: no waiting for its lock, and a passphrase
    /// only from a file, a command or the environment, never a prompt.
    pub fn open_repo_for_completion(
        &self,
        path: &Path,
        mode: LockMode,
        bar: &Bar,
    ) -> anyhow::Result<Repository> {
        let source = self.passphrase.clone();
        self.open_with_passphrase(path, mode, 0, &|| source.get_without_prompt(), bar)
    }

    /// [`Context::open_repo`] for a second repository whose passphrase comes from `source`
    /// (the destination of `vmrepo copy`).
    pub fn open_other_repo(
        &self,
        path: &Path,
        mode: LockMode,
        source: &Source,
        bar: &Bar,
    ) -> anyhow::Result<Repository> {
        self.open_with_passphrase(path, mode, self.lock_wait, &|| source.get(false), bar)
    }

    fn open_with_passphrase(
        &self,
        path: &Path,
        mode: LockMode,
        lock_wait: u64,
        passphrase: &dyn Fn() -> anyhow::Result<Zeroizing<String>>,
        bar: &Bar,
    ) -> anyhow::Result<Repository> {
        let repo = Repository::open_with(
            path,
            mode,
            &vmrepo::repo::OpenOptions {
                lock_wait: Duration::from_secs(lock_wait),
                on_wait: &|msg| bar.note(msg),
                passphrase: &|| {
                    passphrase().map_err(|e| {
                        vmrepo::Error::Usage(format!(
                            "repository {} is encrypted: {e:#}",
                            path.display()
                        ))
                    })
                },
                remote: &self.remote,
            },
        )?;
        if let Some(why) = repo.unguarded() {
            bar.note(&format!("warning: {why}"));
        }
        if vmrepo::backend::is_remote(path) {
            use vmrepo::maintain::cache::{refresh, Refreshed};
            match refresh(&repo, bar).with_context(|| {
                format!(
                    "cannot bring this host's cache of the index of {} up to date",
                    path.display()
                )
            })? {
                Refreshed::Current => {}
                Refreshed::Added {
                    packs,
                    described,
                    generations,
                    pruned,
                } => bar.note(&format!(
                    "index cache: added {packs} pack(s) ({described} known from their \
                     descriptions, the rest read) and {generations} generation(s) that other \
                     hosts wrote, removed {pruned} generation(s) they pruned"
                )),
                Refreshed::Rebuilt {
                    why,
                    packs,
                    described,
                } => bar.note(&format!(
                    "index cache rebuilt from the repository ({packs} pack(s), {described} of \
                     them known from their descriptions, the rest read): {why}"
                )),
            }
        }
        Ok(repo)
    }
}
