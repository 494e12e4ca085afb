//! Where each part of a repository lives in its backend: the key of every object, in one
//! place (docs/FORMAT.md, "Layout").

/// The configuration (TOML), written last at init: a location without it is not a repository.
pub const CONFIG: &str = "config.toml";
/// The folder of pack files, sharded by the first two hex digits of a pack's name.
pub const DATA: &str = "data/";
/// The folder of lock files and commit markers.
pub const LOCKS: &str = "locks/";
/// The folder of key files (encrypted repositories).
pub const KEYS: &str = "keys/";
/// The number of gc runs that deleted or rewrote pack files, as text.
pub const GC_EPOCH: &str = "gc-epoch";
/// The repository lock: shared by commands that add or read, exclusive for those that delete.
pub const REPOSITORY_LOCK: &str = "locks/repository.lock";

/// The folder of pack descriptions (`repo/pack_index.rs`).
pub const PACK_INDEX: &str = "pack-index/";

/// The key of the description of pack `name` alone.
pub fn pack_description(name: &str) -> String {
    format!("{PACK_INDEX}{name}")
}

/// The key of a compacted description of packs whose names start with `shard` (two hex
/// digits); `tag` (16 hex digits) tells apart the objects of one shard.
pub fn shard_description(shard: &str, tag: &str) -> String {
    format!("{PACK_INDEX}{shard}-{tag}")
}

/// What a key listed under [`PACK_INDEX`] describes.
#[derive(Debug, PartialEq, Eq)]
pub enum Described<'k> {
    /// One pack, by name.
    Pack(&'k str),
    /// Packs of one shard, compacted.
    Shard(&'k str),
}

/// What the key of a description describes; `None` for anything else.
pub fn description_of(key: &str) -> Option<Described<'_>> {
    let rest = key.strip_prefix(PACK_INDEX)?;
    if is_pack_name(rest) {
        return Some(Described::Pack(rest));
    }
    let (shard, tag) = rest.split_once('-')?;
    let hex = |s: &str, n| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(shard, 2) && hex(tag, 16)).then_some(Described::Shard(shard))
}

/// The key of the pack named `name` (32 hex digits; anything else, which only a damaged or
/// hostile index can name, gets a key no pack has).
pub fn pack(name: &str) -> String {
    if is_pack_name(name) {
        format!("{DATA}{}/{name}.pack", &name[..2])
    } else {
        format!("{DATA}not-a-pack-name/{}", hex::encode(name))
    }
}

/// True for a well-formed pack name: 32 hex digits.
pub fn is_pack_name(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The pack name in a key listed under [`DATA`], if the key is a pack's.
pub fn pack_name(key: &str) -> Option<&str> {
    let file = key.strip_prefix(DATA)?.rsplit('/').next()?;
    let stem = file.strip_suffix(".pack")?;
    is_pack_name(stem).then_some(stem)
}

/// The key of key file `id`.
pub fn key_file(id: &str) -> String {
    format!("{KEYS}{id}.key")
}

/// The lock taken while key files are removed (`key remove`, `key passwd`): a removal checks
/// that another key stays, and two at once could each leave only the other's.
pub const KEYS_LOCK: &str = "locks/keys.lock";

/// The key of a VM's ingest lock (`tag` is a hash, so the VM's name never shows).
pub fn vm_lock(tag: &str) -> String {
    format!("{LOCKS}vm-{tag}.lock")
}

/// The prefix of the markers of a repository whose index is its own (a directory).
pub const UNCOMMITTED: &str = "locks/uncommitted-";

/// The prefix of the markers of a repository in object storage.
pub const PENDING: &str = "locks/pending-";

/// The marker an ingest leaves while it commits its last pack (the one holding its manifest).
///
/// In a directory, where the index is the repository's own and its transaction is the commit,
/// the marker is `locks/uncommitted-<pack>`: created before that pack is sealed and removed
/// after the commit. A marker whose pack is not in the index says the ingest died in between,
/// so that pack's manifest is not a generation the index lost but one never committed (never
/// reported saved): the pack is a left-over. A marker whose pack is indexed is one the process
/// did not live to remove. Not made durable: lost in a crash, the pack's generation is adopted
/// instead, which is also safe.
///
/// In object storage each host's index is a cache, so the commit must be in the bucket: the
/// marker is `locks/pending-<pack>`, created before that pack is uploaded and deleted (the
/// commit) before the host's cache records the generation. A pending marker always means the
/// pack's manifest was never committed. A marker named `uncommitted-` in a bucket (earlier builds used
/// the directory protocol there too, deleting it after the commit) says nothing and is ignored.
pub fn uncommitted_marker(pack: &str, remote: bool) -> String {
    if remote {
        format!("{PENDING}{pack}")
    } else {
        format!("{UNCOMMITTED}{pack}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_keys_round_trip_and_strangers_are_not_packs() {
        let name = "0123456789abcdef0123456789abcdef";
        assert_eq!(pack(name), format!("data/01/{name}.pack"));
        assert_eq!(pack_name(&pack(name)), Some(name));
        assert_eq!(pack_name("data/01/short.pack"), None);
        assert_eq!(pack_name(&format!("data/01/{name}.pack.tmp-1")), None);
        assert_eq!(pack_name(&format!("keys/{name}.pack")), None);
        assert!(pack("../../etc/passwd").starts_with("data/not-a-pack-name/"));
        assert!(pack("").starts_with("data/"));
    }

    #[test]
    fn description_keys_round_trip() {
        let name = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            description_of(&pack_description(name)),
            Some(Described::Pack(name))
        );
        let shard = shard_description("0a", "0011223344556677");
        assert_eq!(description_of(&shard), Some(Described::Shard("0a")));
        for stranger in [
            "pack-index/0a-00",
            "pack-index/zz-0011223344556677",
            "data/0a",
        ] {
            assert_eq!(description_of(stranger), None, "{stranger}");
        }
    }
}
