//! Key files of an encrypted repository (`keys/<id>.key`): each holds the master key wrapped
//! (AES-256-GCM) by a key derived from one passphrase with argon2id. Several key files may exist,
//! one per passphrase; any one unlocks the repository. The argon2 parameters and salt are stored
//! in the file, so they can be raised for new keys without touching old ones.

use std::path::Path;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::backend::{Backend, Durability};
use crate::error::{Error, IoContext, Result};
use crate::repo::crypto::{self, MasterKey};
use crate::repo::layout;

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

impl KdfCost {
    /// The most argon2id memory a key file may ask for, in KiB: 4 GiB (`--kdf-memory 4096`).
    pub const MAX_MEMORY_KIB: u32 = 4 << 20;
    /// The most passes a key file may ask for (vmrepo writes 3).
    pub const MAX_ITERATIONS: u32 = 16;
    /// The most lanes a key file may ask for (vmrepo writes 1).
    pub const MAX_PARALLELISM: u32 = 16;

    /// Why this cost is outside what vmrepo writes and reads, if it is: a key file asking for
    /// more would make every command that opens the repository allocate or compute without
    /// bound before it could say that the passphrase is wrong.
    pub fn out_of_bounds(&self) -> Option<String> {
        let ok = (1..=Self::MAX_ITERATIONS).contains(&self.iterations)
            && (1..=Self::MAX_PARALLELISM).contains(&self.parallelism)
            && (8 * self.parallelism..=Self::MAX_MEMORY_KIB).contains(&self.memory_kib);
        (!ok).then(|| {
            format!(
                "its argon2id cost ({} KiB of memory, {} passes, {} lanes) is outside what \
                 vmrepo writes (at most {} MiB, {} passes, {} lanes)",
                self.memory_kib,
                self.iterations,
                self.parallelism,
                Self::MAX_MEMORY_KIB >> 10,
                Self::MAX_ITERATIONS,
                Self::MAX_PARALLELISM
            )
        })
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
    if let Some(why) = cost.out_of_bounds() {
        return Err(Error::Usage(format!("cannot derive a key: {why}")));
    }
    let params = argon2::Params::new(cost.memory_kib, cost.iterations, cost.parallelism, Some(32))
        .map_err(|e| Error::Usage(format!("invalid argon2 parameters: {e}")))?;
    // The memory is reserved here, not inside argon2, so that a host without it gets an error
    // instead of an abort. Its blocks are derived from the passphrase: they are overwritten
    // before they are freed (`Zeroizing`), on success and on error alike.
    let mut blocks: Zeroizing<Vec<argon2::Block>> = Zeroizing::new(Vec::new());
    blocks
        .try_reserve_exact(params.block_count())
        .map_err(|_| {
            Error::Usage(format!(
                "key derivation needs {} MiB of memory (the key file's argon2id cost), and this \
             process could not get it: run where more memory is free, or raise the limit \
             (ulimit -v)",
                cost.memory_kib >> 10
            ))
        })?;
    blocks.resize(params.block_count(), argon2::Block::default());
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into_with_memory(passphrase.as_bytes(), salt, &mut out[..], &mut blocks[..])
        .map_err(|e| Error::Usage(format!("key derivation failed: {e}")))?;
    Ok(out)
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| Error::Usage(format!("no randomness: {e}")))?;
    Ok(b)
}

/// Wraps `master` under `passphrase` and writes a new key file; returns it. `repository_id` is
/// bound into the wrapping so a key file cannot be moved to another repository.
pub fn create(
    backend: &dyn Backend,
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
    let mut wrapped = Vec::new();
    crypto::seal_into(
        &crypto::aead_key(&kek),
        nonce,
        repository_id.as_bytes(),
        &master[..],
        &mut wrapped,
    );
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
    let text = serde_json::to_string_pretty(&file).expect("key file serializes");
    let key = layout::key_file(&file.id);
    backend
        .put(&key, text.as_bytes(), Durability::Synced)
        .ctx("write key file", backend.path(&key))?;
    Ok(file)
}

/// Every key file of the repository, oldest first.
pub fn list(backend: &dyn Backend) -> Result<Vec<KeyFile>> {
    let mut out = Vec::new();
    let found = backend
        .list(layout::KEYS)
        .ctx("read directory", backend.path(layout::KEYS))?;
    for e in found.iter().filter(|e| e.key.ends_with(".key")) {
        let path = backend.path(&e.key);
        let text = backend.get(&e.key).ctx("read key file", &path)?;
        let text = String::from_utf8_lossy(&text);
        let k: KeyFile = serde_json::from_str(&text)
            .map_err(|e| Error::bad_input(&path, format!("not a vmrepo key file: {e}")))?;
        if k.version != 1 || k.kdf != "argon2id" {
            return Err(Error::bad_input(
                &path,
                format!("key file version {} / kdf {} is unknown", k.version, k.kdf),
            ));
        }
        if let Some(why) = k.cost.out_of_bounds() {
            return Err(Error::bad_input(
                &path,
                format!(
                    "{why}: the file is damaged or was not made by vmrepo; move it out of {} \
                     and open the repository with another key (or add one from an exported \
                     master key: `vmrepo key add --from-master-key`)",
                    layout::KEYS
                ),
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
    let kek = derive(passphrase, &salt, k.cost)
        .map_err(|e| Error::Usage(format!("key file {}: {e}", k.id)))?;
    let plain = crypto::open_detached(
        &crypto::aead_key(&kek),
        &nonce,
        repository_id.as_bytes(),
        &wrapped,
    )
    .map(Zeroizing::new);
    Ok(match plain {
        Some(p) if p.len() == 32 => {
            let mut m = Zeroizing::new([0u8; 32]);
            m.copy_from_slice(&p);
            Some(m)
        }
        _ => None,
    })
}

/// Unlocks the master key with `passphrase`; returns it and the id of the key file that opened.
pub fn unlock(
    backend: &dyn Backend,
    repository_id: &str,
    passphrase: &str,
) -> Result<(MasterKey, String)> {
    let keys = list(backend)?;
    if keys.is_empty() {
        return Err(Error::Corrupt(format!(
            "repository {} is encrypted but has no key files in {}; without a key (or an \
             exported master key) its data cannot be read",
            backend.location().display(),
            layout::KEYS
        )));
    }
    for k in &keys {
        if let Some(m) = try_unwrap(k, repository_id, passphrase)? {
            return Ok((m, k.id.clone()));
        }
    }
    Err(Error::WrongPassphrase {
        repo: backend.location().to_path_buf(),
        keys: keys.len(),
    })
}

/// Deletes key file `id`. Refuses to delete the last one.
pub fn remove(backend: &dyn Backend, id: &str) -> Result<()> {
    let keys = list(backend)?;
    if !keys.iter().any(|k| k.id == id) {
        return Err(Error::NotFound(format!(
            "no key {id:?} in repository {} (see `vmrepo key list`)",
            backend.location().display()
        )));
    }
    if keys.len() == 1 {
        return Err(Error::Usage(
            "refusing to remove the only key: without a key the repository cannot be read".into(),
        ));
    }
    let key = layout::key_file(id);
    backend
        .delete(std::slice::from_ref(&key), Durability::Synced)
        .ctx("delete key file", backend.path(&key))
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
        let b = crate::backend::LocalBackend::create(t.path()).unwrap();
        let master = Zeroizing::new([9u8; 32]);
        let k1 = create(&b, "repo1", &master, "correct horse", CHEAP, "a").unwrap();
        let k2 = create(&b, "repo1", &master, "battery staple", CHEAP, "b").unwrap();
        let (m, id) = unlock(&b, "repo1", "battery staple").unwrap();
        assert_eq!(*m, *master);
        assert_eq!(id, k2.id);
        assert!(matches!(
            unlock(&b, "repo1", "wrong"),
            Err(Error::WrongPassphrase { keys: 2, .. })
        ));
        // Bound to the repository id.
        assert!(unlock(&b, "repo2", "correct horse").is_err());
        remove(&b, &k1.id).unwrap();
        assert!(unlock(&b, "repo1", "correct horse").is_err());
        assert!(remove(&b, &k2.id).is_err(), "the last key must stay");
    }
}
