//! vmrepo: a content-addressed, deduplicating, compressed repository for virtual machine backups.
//!
//! Data flow (docs/ARCHITECTURE.md): [`vm`] opens a VM directory or disk image into readers
//! ([`source`]); [`ingest`] cuts each disk into fixed segments and FastCDC chunks
//! ([`chunker`]), stores new objects through [`store`] into [`pack`] files and records them in
//! the SQLite [`index`]; a generation is its [`manifest`]. [`extract`] and [`check`] read back.

pub mod changes;
pub mod check;
pub mod chunker;
pub mod config;
pub mod confine;
pub mod coverage;
pub mod crypto;
pub mod damage;
pub mod descriptor;
pub mod disk_map;
pub mod error;
pub mod extract;
pub mod fsutil;
pub mod fuzzing;
pub mod gc;
pub mod ghettovcb;
pub mod hooks;
pub mod id;
pub mod index;
pub mod ingest;
pub mod inspect;
pub mod job;
pub mod keyfile;
pub mod leaves;
pub mod lock;
pub mod manifest;
pub mod mount;
pub mod nbd;
pub mod object;
pub mod pack;
pub mod patch;
pub mod preflight;
pub mod progress;
pub mod prune;
pub mod reader;
pub mod relocate;
pub mod repair;
pub mod repo;
pub mod retention;
pub mod safe_fs;
pub mod shutdown;
pub mod source;
pub mod space;
pub mod store;
pub mod vm;
pub mod vmsd;
pub mod vmx;
pub mod writer;

pub use error::{Error, Result};
pub use id::ObjectId;
pub use repo::Repository;
