//! vmrepo: a content-addressed, deduplicating, compressed repository for virtual machine backups.
//!
//! Data flow (docs/ARCHITECTURE.md): [`vmware::vm`] opens a VM directory or disk image into
//! readers ([`source`]); [`ingest`] cuts each disk into fixed segments and FastCDC chunks
//! ([`ingest::chunker`]), stores new objects through [`repo::store`] into [`repo::pack`] files
//! and records them in the SQLite [`repo::index`]; a generation is its [`repo::manifest`].
//! [`restore`] reads generations back; [`maintain`] checks, prunes and collects garbage.

// Layers, bottom up (docs/ARCHITECTURE.md): base modules (error, progress, space, fsutil,
// ioprio, shutdown, throttle, zero); backend (the storage seam); repo; source; vmware;
// maintain; copy; restore; guest; ingest. A layer uses only those below it; `tests::layers` holds the
// code to that.
pub mod backend;
pub mod copy;
pub mod error;
pub mod fsutil;
pub mod fuzzing;
pub mod guest;
pub mod ingest;
pub mod ioprio;
pub mod maintain;
pub mod progress;
pub mod repo;
pub mod restore;
pub mod shutdown;
pub mod source;
pub mod space;
pub mod throttle;
pub mod vmware;
pub mod vsphere;
pub mod zero;
pub use error::{Error, Result};
pub use repo::id::ObjectId;
pub use repo::Repository;

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    /// The layer a top-level module belongs to.
    fn layer_of(module: &str) -> &str {
        match module {
            "error" | "progress" | "space" | "fsutil" | "ioprio" | "shutdown" | "throttle"
            | "zero" | "Error" | "Result" => "base",
            "ObjectId" | "Repository" => "repo",
            other => other,
        }
    }

    /// Which layers each layer may use (docs/ARCHITECTURE.md, "Layers").
    fn may_use(layer: &str) -> &'static [&'static str] {
        match layer {
            "base" => &["base"],
            "backend" => &["base", "backend"],
            "repo" => &["base", "backend", "repo"],
            "source" => &["base", "source"],
            "vmware" => &["base", "repo", "source", "vmware"],
            "maintain" => &["base", "backend", "repo", "maintain"],
            "copy" => &["base", "backend", "repo", "maintain", "copy"],
            "restore" => &["base", "repo", "source", "vmware", "maintain", "restore"],
            "guest" => &["base", "repo", "restore", "guest"],
            "vsphere" => &["base", "source", "vmware", "vsphere"],
            "ingest" => &[
                "base", "backend", "repo", "source", "vmware", "vsphere", "maintain", "copy",
                "ingest",
            ],
            other => panic!("no rule for layer {other}: add it here and to ARCHITECTURE.md"),
        }
    }

    /// Every `.rs` file under `src/`, for tests that hold the source to a rule.
    pub(crate) fn rust_sources() -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
        out
    }

    /// No module uses a layer above its own (nor a sibling layer it has no business with):
    /// the import graph has no cycle, and a change to a lower layer never needs a higher one.
    /// Unit tests (after `#[cfg(test)]`) may use anything.
    #[test]
    fn layers() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut offenders = Vec::new();
        for f in rust_sources() {
            let rel = f.strip_prefix(&root).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_str()
                .unwrap();
            let own = match first.strip_suffix(".rs").unwrap_or(first) {
                // The binary (main.rs, cli/), the crate root and the fuzzing harness sit on top.
                "main" | "cli" | "lib" | "fuzzing" => continue,
                m => layer_of(m).to_string(),
            };
            let text = std::fs::read_to_string(&f).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            let mut used = BTreeSet::new();
            for (k, _) in code.match_indices("crate::") {
                let name: String = code[k + 7..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                used.insert(layer_of(&name).to_string());
            }
            for l in used {
                if !may_use(&own).contains(&l.as_str()) {
                    offenders.push(format!("{} ({own}) uses {l}", rel.display()));
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "layering broken:\n{}",
            offenders.join("\n")
        );
    }

    /// Library messages name the user's settings through `error::Setting`, so a job file's
    /// user reads its keys and a command-line user the flags. What stays spelled as a flag
    /// here: whole commands to run (`vmrepo check --repair`), and the flags of what only the
    /// command line does (extract's --force and --allow-damaged, ingest's --changed-ranges,
    /// the passphrase flags that every command, `vmrepo run` too, takes).
    #[test]
    fn library_messages_name_settings_not_flags() {
        const COMMAND_LINE_ONLY: &[&str] = &[
            "--force",
            "--allow-damaged",
            "--password-file",
            "--password-command",
            "--changed-ranges",
        ];
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut offenders = Vec::new();
        for f in rust_sources() {
            let rel = f.strip_prefix(&root).unwrap();
            if rel.starts_with("cli") || rel == Path::new("main.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap();
            let code: String = text
                .split("#[cfg(test)]")
                .next()
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .filter(|l| !(rel == Path::new("error.rs") && l.contains("=> \"--")))
                .map(|l| l.trim_start().to_string() + "\n")
                .collect::<String>()
                .replace("\\\n", "");
            for (k, _) in code.match_indices("--") {
                let flag: String = code[k..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '-')
                    .collect();
                if flag.len() < 3 || COMMAND_LINE_ONLY.contains(&flag.as_str()) {
                    continue;
                }
                let before = &code[..k];
                let command = before.rfind('`').is_some_and(|b| {
                    before[b..].starts_with("`vmrepo ") && !before[b..].contains('\n')
                });
                if !command {
                    offenders.push(format!("{}: {flag}", rel.display()));
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "library messages naming flags (use error::Setting):\n{}",
            offenders.join("\n")
        );
    }
}
