//! Object identifiers: 32-byte BLAKE3 digests, shown as lowercase hex.

use std::fmt;

/// The content address of a stored object (BLAKE3 of its plaintext).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub [u8; 32]);

impl ObjectId {
    /// The reserved all-zero id: marks an all-zero segment in a disk map. BLAKE3 never yields it in practice.
    pub const ZERO: ObjectId = ObjectId([0u8; 32]);

    /// Hashes `data` into its id.
    pub fn of(data: &[u8]) -> ObjectId {
        ObjectId(*blake3::hash(data).as_bytes())
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<ObjectId> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ObjectId(out))
    }

    /// Builds an id from a byte slice of exactly 32 bytes.
    pub fn from_slice(b: &[u8]) -> Option<ObjectId> {
        Some(ObjectId(b.try_into().ok()?))
    }

    /// Full lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits, for messages.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }

    /// True for [`ObjectId::ZERO`].
    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({})", self.short())
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl serde::Serialize for ObjectId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for ObjectId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ObjectId::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("object id must be 64 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ObjectId::of(b"hello");
        assert_eq!(ObjectId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(ObjectId::from_hex("zz"), None);
        assert!(!id.is_zero());
    }
}
