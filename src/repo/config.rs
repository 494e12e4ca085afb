//! The repository's versioned configuration file (`config.toml`): format version, chunker and
//! compression parameters fixed at `init`, and the encryption mode.

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Durability};
use crate::error::{Error, IoContext, Result};

/// The newest repository format this build reads and writes, the format `init` makes: 4 since
/// chunks may be stored as deltas of other chunks ([`DELTA_CHUNKS_SINCE`]), 3 since segments
/// may be stored as deltas of other segments ([`DELTA_SEGMENTS_SINCE`]). Repositories of
/// earlier formats are read and written as they are, without what later formats added, so
/// that the builds that made them still read them.
pub const FORMAT_VERSION: u32 = 4;

/// The first format whose segments may be stored as differences from another segment.
pub const DELTA_SEGMENTS_SINCE: u32 = 3;

/// The first format whose chunks may be stored compressed against another chunk.
pub const DELTA_CHUNKS_SINCE: u32 = 4;

/// The oldest format a repository whose chunker cuts at `cut_points` may have.
pub fn format_version_for(cut_points: CutPoints) -> u32 {
    match cut_points {
        CutPoints::Public => 1,
        CutPoints::Keyed => 2,
    }
}

/// Whether `init` can make a repository of format `format` whose chunker cuts at `cut_points`:
/// an earlier format than the newest lacks what later ones added (chunk deltas since 4,
/// segment deltas since 3) and is read by the builds of that format; keyed cut points (an
/// encrypted repository) need format 2 at least.
pub fn check_new_format(format: u32, cut_points: CutPoints) -> Result<()> {
    let oldest = format_version_for(cut_points);
    if (oldest..=FORMAT_VERSION).contains(&format) {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "format {format} cannot be made: this vmrepo makes formats {oldest} to \
         {FORMAT_VERSION}{}",
        if oldest > 1 {
            " for an encrypted repository (its keyed cut points need format 2)"
        } else {
            ""
        }
    )))
}

/// Key of the configuration file in a repository.
pub const CONFIG_FILE: &str = crate::repo::layout::CONFIG;

/// Everything fixed for the life of a repository.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Config {
    /// Repository format version (see docs/FORMAT.md).
    pub format_version: u32,
    /// Random 128-bit id, hex.
    pub repository_id: String,
    /// UTC time of `init`.
    pub created: String,
    /// Segmenting and content-defined chunking parameters.
    pub chunker: ChunkerParams,
    /// Compression of stored objects.
    pub compression: CompressionParams,
    /// Encryption of stored objects.
    pub encryption: EncryptionParams,
}

/// How disks are cut: fixed segments, then FastCDC inside each segment's non-zero runs.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChunkerParams {
    /// Disks are split at fixed offsets into segments of this many bytes.
    pub segment_size: u32,
    /// FastCDC minimum chunk size.
    pub min_size: u32,
    /// FastCDC average (target) chunk size.
    pub avg_size: u32,
    /// FastCDC maximum chunk size.
    pub max_size: u32,
    /// Zero detection granularity (bytes, aligned to the segment).
    pub zero_block: u32,
    /// Shortest all-zero run recorded as a zero extent instead of data.
    pub zero_run_min: u32,
    /// Which gear table FastCDC cuts with (absent in config.toml: the published one).
    #[serde(default, skip_serializing_if = "CutPoints::is_public")]
    pub cut_points: CutPoints,
}

/// Where FastCDC may cut: decided by the published gear table, so anyone can compute the chunk
/// lengths of a known file, or by a table derived from an encrypted repository's master key
/// (docs/SECURITY.md, "Chunk lengths").
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CutPoints {
    /// FastCDC's published gear table (fastcdc crate, v2020, seed 0).
    #[default]
    Public,
    /// A secret gear table derived from the master key; encrypted repositories only.
    Keyed,
}

impl CutPoints {
    /// What `init` chooses: keyed cut points exactly when the repository is encrypted.
    pub fn for_encryption(encrypted: bool) -> CutPoints {
        if encrypted {
            CutPoints::Keyed
        } else {
            CutPoints::Public
        }
    }

    /// True for [`CutPoints::Public`].
    pub fn is_public(&self) -> bool {
        *self == CutPoints::Public
    }
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            // Chosen by scripts/chunk-sweep.sh (docs/PERFORMANCE.md): 16 KiB chunks store the
            // least per night; 4 MiB segments let more unchanged segments skip re-chunking.
            segment_size: 4 << 20,
            min_size: 4 << 10,
            avg_size: 16 << 10,
            max_size: 64 << 10,
            zero_block: 4096,
            zero_run_min: 64 << 10,
            cut_points: CutPoints::Public,
        }
    }
}

impl ChunkerParams {
    /// Checks that the parameters are usable by the chunker.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let p = self;
        use fastcdc::v2020 as cdc;
        if !(cdc::MINIMUM_MIN..=cdc::MINIMUM_MAX).contains(&p.min_size)
            || !(cdc::AVERAGE_MIN..=cdc::AVERAGE_MAX).contains(&p.avg_size)
            || !(cdc::MAXIMUM_MIN..=cdc::MAXIMUM_MAX).contains(&p.max_size)
            || p.min_size > p.avg_size
            || p.avg_size > p.max_size
        {
            return Err(format!(
                "chunk sizes must satisfy min <= avg <= max with min 64 B..1 MiB, avg 256 B..4 MiB, \
                 max 1 KiB..16 MiB; got {}/{}/{}",
                p.min_size, p.avg_size, p.max_size
            ));
        }
        if p.zero_block == 0 || !p.zero_block.is_power_of_two() || p.zero_block > p.min_size {
            return Err("zero_block must be a power of two no larger than min_size".into());
        }
        if p.segment_size < p.max_size
            || !p.segment_size.is_multiple_of(p.zero_block)
            || p.segment_size > (1 << 30)
        {
            return Err(
                "segment_size must be a multiple of zero_block, at least max_size, at most 1 GiB"
                    .into(),
            );
        }
        if p.zero_run_min < p.zero_block {
            return Err("zero_run_min must be at least zero_block".into());
        }
        Ok(())
    }
}

/// Compression settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CompressionParams {
    /// Only "zstd" in format 1.
    pub algorithm: String,
    /// zstd level (1..=19).
    pub level: i32,
}

impl Default for CompressionParams {
    fn default() -> Self {
        CompressionParams {
            algorithm: "zstd".into(),
            level: 3,
        }
    }
}

/// Encryption settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EncryptionParams {
    /// "none", or "aes-256-gcm" (objects and sensitive index fields encrypted; keys in keys/).
    pub mode: String,
}

/// The encryption mode names `init` accepts.
pub const ENCRYPTION_MODES: &[&str] = &["none", "aes-256-gcm"];

impl Default for EncryptionParams {
    fn default() -> Self {
        EncryptionParams {
            mode: "none".into(),
        }
    }
}

impl Config {
    /// A fresh configuration with default parameters. An encrypted repository cuts at keyed
    /// points.
    pub fn new(mut chunker: ChunkerParams, level: i32, encryption: &str) -> Result<Config> {
        if !ENCRYPTION_MODES.contains(&encryption) {
            return Err(Error::Usage(format!(
                "unknown encryption {encryption:?}: use one of {}",
                ENCRYPTION_MODES.join(", ")
            )));
        }
        chunker.validate().map_err(Error::Usage)?;
        if !(1..=19).contains(&level) {
            return Err(Error::Usage(format!(
                "compression level must be 1..19, got {level}"
            )));
        }
        chunker.cut_points = CutPoints::for_encryption(encryption != "none");
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| Error::Usage(format!("no randomness: {e}")))?;
        Ok(Config {
            format_version: FORMAT_VERSION,
            repository_id: hex::encode(id),
            created: jiff::Timestamp::now()
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string(),
            chunker,
            compression: CompressionParams {
                level,
                ..Default::default()
            },
            encryption: EncryptionParams {
                mode: encryption.to_string(),
            },
        })
    }

    /// This new configuration at format `format` instead of the newest ([`check_new_format`]).
    pub fn with_format(mut self, format: u32) -> Result<Config> {
        check_new_format(format, self.chunker.cut_points)?;
        self.format_version = format;
        Ok(self)
    }

    /// Reads and validates `config.toml` of the repository at `repo`.
    pub fn load(backend: &dyn Backend) -> Result<Config> {
        let repo = backend.location();
        let path = backend.path(CONFIG_FILE);
        let text = match backend.get(CONFIG_FILE) {
            Ok(t) => String::from_utf8(t).map_err(|_| Error::NotARepository {
                path: repo.to_path_buf(),
                reason: format!("{CONFIG_FILE} is not text"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotARepository {
                    path: repo.to_path_buf(),
                    reason: format!("{CONFIG_FILE} is missing"),
                })
            }
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        let value: toml::Table = toml::from_str(&text).map_err(|e| Error::NotARepository {
            path: repo.to_path_buf(),
            reason: format!("{CONFIG_FILE} is not valid TOML: {}", e.message()),
        })?;
        let found = value
            .get("format_version")
            .and_then(|v| v.as_integer())
            .ok_or_else(|| Error::NotARepository {
                path: repo.to_path_buf(),
                reason: format!("{CONFIG_FILE} has no format_version"),
            })?;
        if found > FORMAT_VERSION as i64 || found < 1 {
            return Err(Error::NewerFormat {
                path: repo.to_path_buf(),
                found: found.clamp(0, u32::MAX as i64) as u32,
                supported: FORMAT_VERSION,
            });
        }
        let config: Config = toml::from_str(&text).map_err(|e| {
            Error::bad_input(&path, format!("invalid configuration: {}", e.message()))
        })?;
        config
            .chunker
            .validate()
            .map_err(|r| Error::bad_input(&path, r))?;
        if config.compression.algorithm != "zstd" {
            return Err(Error::Unsupported {
                what: format!("compression {:?}", config.compression.algorithm),
                path,
            });
        }
        if !ENCRYPTION_MODES.contains(&config.encryption.mode.as_str()) {
            return Err(Error::Unsupported {
                what: format!("encryption {:?}", config.encryption.mode),
                path,
            });
        }
        if config.chunker.cut_points == CutPoints::Keyed && !config.encrypted() {
            return Err(Error::bad_input(
                &path,
                "keyed cut points need an encrypted repository (the key derives them); \
                 this config.toml was edited or damaged: restore it from a copy",
            ));
        }
        if config.format_version < format_version_for(config.chunker.cut_points) {
            return Err(Error::bad_input(
                &path,
                format!(
                    "keyed cut points need format_version {}, the file says {}: \
                     this config.toml was edited or damaged: restore it from a copy",
                    format_version_for(config.chunker.cut_points),
                    config.format_version
                ),
            ));
        }
        Ok(config)
    }

    /// True if objects and sensitive index fields are encrypted.
    pub fn encrypted(&self) -> bool {
        self.encryption.mode != "none"
    }

    /// Serializes to TOML text.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string_pretty(self).expect("config serializes");
        format!("# vmrepo repository configuration. Do not edit: the parameters are fixed at init.\n{body}")
    }

    /// Writes the file durably and atomically.
    pub fn store(&self, backend: &dyn Backend) -> Result<()> {
        backend
            .put(CONFIG_FILE, self.to_toml().as_bytes(), Durability::Synced)
            .ctx("write", backend.path(CONFIG_FILE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = Config::new(ChunkerParams::default(), 3, "aes-256-gcm").unwrap();
        assert!(c.encrypted());
        assert!(Config::new(ChunkerParams::default(), 3, "rot13").is_err());
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn rejects_bad_chunk_sizes() {
        let p = ChunkerParams {
            min_size: 128 << 10,
            ..Default::default()
        };
        assert!(p.validate().is_err());
    }
}
