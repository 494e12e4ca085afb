//! Key files of an encrypted repository (`keys/<id>.key`): each holds the master key wrapped
//! (AES-256-GCM) by a key derived from one passphrase with argon2id. Several key files may exist,
//! one per passphrase; any one unlocks the repository. The argon2 parameters and salt are stored
//! in the file, so they can be raised for new keys without touching old ones.

use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, IoContext, Result};
use crate::repo::crypto::MasterKey;

/// Directory of the key files inside a repository.
pub const KEYS_DIR: &str = "keys";

/// argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfCost {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for KdfCost {
    /// 64 MiB, 3 passes, 1 lane: about a quarter of a second on a current server core.
    fn default() -> Self {
        KdfCost {
            memory_kib: 64 << 10,
            iterations: 3,
            parallelism: 1,
        }
    }
}

/// The stored form of a key file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyFile {
    /// Key file format version (1).
    pub version: u32,
    /// 16 hex digits, also the file name.
    pub id: String,
    /// UTC creation time.
    pub created: String,
    /// Free text to tell keys apart (`admin`, `offsite`), never needed to unlock.
    #[serde(default)]
    pub label: String,
    /// `argon2id`.
    pub kdf: String,
    /// Its cost.
    pub cost: KdfCost,
    /// Salt, hex.
    pub salt: String,
    /// AES-256-GCM nonce, hex.
    pub nonce: String,
    /// The wrapped master key (ciphertext and tag), hex.
    pub wrapped: String,
}

fn derive(passphrase: &str, salt: &[u8], cost: KdfCost) -> Result<Zeroizing<[u8; 32]>> {
    let params = argon2::Params::new(cost.memory_kib, cost.iterations, cost.parallelism, Some(32))
        .map_err(|e| Error::Usage(format!("invalid argon2 parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase.as_bytes(), salt, &mut out[..])
        .map_err(|e| Error::Usage(format!("key derivation failed: {e}")))?;
    Ok(out)
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| Error::Usage(format!("no randomness: {e}")))?;
    Ok(b)
}

fn key_path(root: &Path, id: &str) -> PathBuf {
    root.join(KEYS_DIR).join(format!("{id}.key"))
}

/// Wraps `master` under `passphrase` and writes a new key file; returns it. `repository_id` is
/// bound into the wrapping so a key file cannot be moved to another repository.
pub fn create(
    root: &Path,
    repository_id: &str,
    master: &MasterKey,
    passphrase: &str,
    cost: KdfCost,
    label: &str,
) -> Result<KeyFile> {
    if passphrase.is_empty() {
        return Err(Error::Usage("the passphrase is empty".into()));
    }
    let salt: [u8; 16] = random()?;
    let nonce: [u8; 12] = random()?;
    let kek = derive(passphrase, &salt, cost)?;
    let wrapped = Aes256Gcm::new_from_slice(&kek[..])
        .expect("32-byte key")
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &master[..],
                aad: repository_id.as_bytes(),
            },
        )
        .expect("AES-GCM wraps 32 bytes");
    let file = KeyFile {
        version: 1,
        id: hex::encode(random::<8>()?),
        created: jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string(),
        label: label.to_string(),
        kdf: "argon2id".into(),
        cost,
        salt: hex::encode(salt),
        nonce: hex::encode(nonce),
        wrapped: hex::encode(wrapped),
    };
    let dir = root.join(KEYS_DIR);
    std::fs::create_dir_all(&dir).ctx("create directory", &dir)?;
    let text = serde_json::to_string_pretty(&file).expect("key file serializes");
    crate::fsutil::write_atomic(&key_path(root, &file.id), text.as_bytes())?;
    Ok(file)
}

/// Every key file of the repository, oldest first.
pub fn list(root: &Path) -> Result<Vec<KeyFile>> {
    let dir = root.join(KEYS_DIR);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).ctx("read directory", &dir)? {
        let path = e.ctx("read directory", &dir)?.path();
        if path.extension().and_then(|x| x.to_str()) != Some("key") {
            continue;
        }
        let text = std::fs::read_to_string(&path).ctx("read key file", &path)?;
        let k: KeyFile = serde_json::from_str(&text)
            .map_err(|e| Error::bad_input(&path, format!("not a vmrepo key file: {e}")))?;
        if k.version != 1 || k.kdf != "argon2id" {
            return Err(Error::bad_input(
                &path,
                format!("key file version {} / kdf {} is unknown", k.version, k.kdf),
            ));
        }
        out.push(k);
    }
    out.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
    Ok(out)
}

/// Tries `passphrase` against one key file.
fn try_unwrap(k: &KeyFile, repository_id: &str, passphrase: &str) -> Result<Option<MasterKey>> {
    let bad = |what: &str| Error::Corrupt(format!("key file {}: {what} is not valid hex", k.id));
    let salt = hex::decode(&k.salt).map_err(|_| bad("salt"))?;
    let nonce = hex::decode(&k.nonce).map_err(|_| bad("nonce"))?;
    let wrapped = hex::decode(&k.wrapped).map_err(|_| bad("wrapped key"))?;
    if nonce.len() != 12 {
        return Err(Error::Corrupt(format!(
            "key file {}: bad nonce length",
            k.id
        )));
    }
    let kek = derive(passphrase, &salt, k.cost)?;
    let plain = Aes256Gcm::new_from_slice(&kek[..])
        .expect("32-byte key")
        .decrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &wrapped,
                aad: repository_id.as_bytes(),
            },
        );
    Ok(match plain {
        Ok(p) if p.len() == 32 => {
            let mut m = Zeroizing::new([0u8; 32]);
            m.copy_from_slice(&p);
            Some(m)
        }
        _ => None,
    })
}

/// Unlocks the master key with `passphrase`; returns it and the id of the key file that opened.
pub fn unlock(root: &Path, repository_id: &str, passphrase: &str) -> Result<(MasterKey, String)> {
    let keys = list(root)?;
    if keys.is_empty() {
        return Err(Error::Corrupt(format!(
            "repository {} is encrypted but has no key files in {}/; without a key (or an exported \
             master key) its data cannot be read",
            root.display(),
            KEYS_DIR
        )));
    }
    for k in &keys {
        if let Some(m) = try_unwrap(k, repository_id, passphrase)? {
            return Ok((m, k.id.clone()));
        }
    }
    Err(Error::WrongPassphrase {
        repo: root.to_path_buf(),
        keys: keys.len(),
    })
}

/// Deletes key file `id`. Refuses to delete the last one.
pub fn remove(root: &Path, id: &str) -> Result<()> {
    let keys = list(root)?;
    if !keys.iter().any(|k| k.id == id) {
        return Err(Error::NotFound(format!(
            "no key {id:?} in repository {} (see `vmrepo key list`)",
            root.display()
        )));
    }
    if keys.len() == 1 {
        return Err(Error::Usage(
            "refusing to remove the only key: without a key the repository cannot be read".into(),
        ));
    }
    let path = key_path(root, id);
    std::fs::remove_file(&path).ctx("delete key file", &path)?;
    crate::fsutil::sync_dir(&root.join(KEYS_DIR))
}

/// The exported form of a master key (`vmrepo key export`).
#[derive(Serialize, Deserialize)]
pub struct ExportedKey {
    /// What this is.
    pub kind: String,
    /// The repository it belongs to.
    pub repository_id: String,
    /// The master key, hex. Whoever holds this can read every backup.
    pub master_key: String,
}

impl ExportedKey {
    /// Parses an exported key and checks it belongs to `repository_id`.
    pub fn parse(path: &Path, text: &str, repository_id: &str) -> Result<MasterKey> {
        let e: ExportedKey = serde_json::from_str(text)
            .map_err(|err| Error::bad_input(path, format!("not an exported vmrepo key: {err}")))?;
        if e.repository_id != repository_id {
            return Err(Error::bad_input(
                path,
                format!(
                    "this key belongs to repository {}, not {repository_id}",
                    e.repository_id
                ),
            ));
        }
        let raw = hex::decode(&e.master_key)
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| Error::bad_input(path, "the master key is not 64 hex digits"))?;
        let mut m = Zeroizing::new([0u8; 32]);
        m.copy_from_slice(&raw);
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHEAP: KdfCost = KdfCost {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    #[test]
    fn wrap_unlock_and_refuse_wrong_passphrases() {
        let t = tempfile::tempdir().unwrap();
        let master = Zeroizing::new([9u8; 32]);
        let k1 = create(t.path(), "repo1", &master, "correct horse", CHEAP, "a").unwrap();
        let k2 = create(t.path(), "repo1", &master, "battery staple", CHEAP, "b").unwrap();
        let (m, id) = unlock(t.path(), "repo1", "battery staple").unwrap();
        assert_eq!(*m, *master);
        assert_eq!(id, k2.id);
        assert!(matches!(
            unlock(t.path(), "repo1", "wrong"),
            Err(Error::WrongPassphrase { keys: 2, .. })
        ));
        // Bound to the repository id.
        assert!(unlock(t.path(), "repo2", "correct horse").is_err());
        remove(t.path(), &k1.id).unwrap();
        assert!(unlock(t.path(), "repo1", "correct horse").is_err());
        assert!(remove(t.path(), &k2.id).is_err(), "the last key must stay");
    }
}
