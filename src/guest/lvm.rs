//! LVM2 physical volumes: the label, the metadata area and the volume group's metadata text,
//! read to find the linear logical volumes stored on the physical volume and where each of
//! their extents lies. Only what is needed to read a logical volume is parsed; a logical volume
//! of another kind (striped over several PVs, mirrored, thin, cached, or partly on another PV)
//! is listed with the reason it cannot be read.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// The magic string of a metadata area header.
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
/// The metadata text read at most.
const MAX_TEXT: u64 = 4 << 20;
/// Nesting of metadata sections followed at most.
const MAX_DEPTH: usize = 16;

/// A logical volume found on a physical volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalVolume {
    /// Volume group name.
    pub vg: String,
    /// Logical volume name.
    pub name: String,
    /// Length in bytes.
    pub size: u64,
    /// Its extents in order: (offset in the LV, offset in the PV, length), or why it cannot be
    /// read.
    pub map: std::result::Result<Vec<(u64, u64, u64)>, String>,
}

fn corrupt(why: String) -> Error {
    Error::GuestFilesystem(format!("LVM2 physical volume: {why}"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The logical volumes of the physical volume of `size` bytes read through `read`.
pub fn read_pv(
    size: u64,
    read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<Vec<LogicalVolume>> {
    let mut head = vec![0u8; 2048.min(size as usize)];
    read(0, &mut head)?;
    let label = (0..4)
        .map(|s| s * 512)
        .find(|&at| {
            head.get(at..at + 8) == Some(b"LABELONE")
                && head.get(at + 24..at + 32) == Some(b"LVM2 001")
        })
        .ok_or_else(|| corrupt("no label in its first four sectors".into()))?;
    let pvh = label + u32_at(&head, label + 20) as usize;
    if pvh + 40 > head.len() {
        return Err(corrupt(
            "the PV header lies outside the label sectors".into(),
        ));
    }
    let uuid: String = String::from_utf8_lossy(&head[pvh..pvh + 32]).into_owned();
    // Data areas, then metadata areas, each list ended by a zero entry.
    let mut at = pvh + 40;
    let mut lists: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
    for list in &mut lists {
        loop {
            if at + 16 > head.len() || list.len() > 8 {
                return Err(corrupt("its area lists do not end".into()));
            }
            let (off, len) = (u64_at(&head, at), u64_at(&head, at + 8));
            at += 16;
            if off == 0 {
                break;
            }
            list.push((off, len));
        }
    }
    let &(mda_at, mda_len) = lists[1]
        .first()
        .ok_or_else(|| corrupt("it has no metadata area".into()))?;
    if mda_at.checked_add(mda_len).is_none_or(|e| e > size) || mda_len < 1024 {
        return Err(corrupt(format!(
            "its metadata area ({mda_len} bytes at {mda_at}) does not fit it"
        )));
    }
    let mut mda = vec![0u8; 512];
    read(mda_at, &mut mda)?;
    if &mda[4..20] != MDA_MAGIC {
        return Err(corrupt("its metadata area has no header".into()));
    }
    let (text_at, text_len) = (u64_at(&mda, 40), u64_at(&mda, 48));
    if text_at == 0 || text_len == 0 {
        return Ok(Vec::new());
    }
    if text_len > MAX_TEXT || text_at >= mda_len || text_at < 512 {
        return Err(corrupt(format!(
            "its metadata text ({text_len} bytes at {text_at}) is out of bounds"
        )));
    }
    // The area is a ring after its 512-byte header.
    let mut text = vec![0u8; text_len as usize];
    let first = text_len.min(mda_len - text_at) as usize;
    read(mda_at + text_at, &mut text[..first])?;
    if first < text.len() {
        if (text.len() - first) as u64 > mda_len - 512 {
            return Err(corrupt("its metadata text is longer than its area".into()));
        }
        read(mda_at + 512, &mut text[first..])?;
    }
    let text = String::from_utf8_lossy(&text);
    let text = text.trim_end_matches('\0');
    logical_volumes(text, &uuid, size)
}

/// A value in LVM's metadata text.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Num(i64),
    Str(String),
    List(Vec<Value>),
    Section(BTreeMap<String, Value>),
}

impl Value {
    fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Section(m) => m.get(key),
            _ => None,
        }
    }
    fn num(&self, key: &str) -> Option<i64> {
        match self.get(key)? {
            Value::Num(n) => Some(*n),
            _ => None,
        }
    }
    fn text(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    fn sections(&self) -> impl Iterator<Item = (&String, &Value)> {
        let m = match self {
            Value::Section(m) => Some(m),
            _ => None,
        };
        m.into_iter()
            .flatten()
            .filter(|(_, v)| matches!(v, Value::Section(_)))
    }
}

/// Parses metadata text: `name = value` and `name { ... }`, values numbers, "strings" and
/// `[lists]`, `#` comments.
fn parse(text: &str) -> std::result::Result<BTreeMap<String, Value>, String> {
    let mut p = Parser {
        b: text.as_bytes(),
        at: 0,
    };
    let top = p.items(0)?;
    p.skip();
    if p.at < p.b.len() {
        return Err(format!(
            "unexpected {:?} at byte {}",
            p.b[p.at] as char, p.at
        ));
    }
    Ok(top)
}

struct Parser<'a> {
    b: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn skip(&mut self) {
        while let Some(&c) = self.b.get(self.at) {
            if c == b'#' {
                while self.b.get(self.at).is_some_and(|&c| c != b'\n') {
                    self.at += 1;
                }
            } else if c.is_ascii_whitespace() {
                self.at += 1;
            } else {
                break;
            }
        }
    }

    fn word(&mut self) -> Option<String> {
        let start = self.at;
        while self
            .b
            .get(self.at)
            .is_some_and(|c| c.is_ascii_alphanumeric() || b"_.+-".contains(c))
        {
            self.at += 1;
        }
        (self.at > start).then(|| String::from_utf8_lossy(&self.b[start..self.at]).into_owned())
    }

    fn items(&mut self, depth: usize) -> std::result::Result<BTreeMap<String, Value>, String> {
        if depth > MAX_DEPTH {
            return Err("sections nested too deep".into());
        }
        let mut out = BTreeMap::new();
        loop {
            self.skip();
            match self.b.get(self.at) {
                None | Some(b'}') => return Ok(out),
                _ => {}
            }
            let key = self
                .word()
                .ok_or_else(|| format!("a name expected at byte {}", self.at))?;
            self.skip();
            match self.b.get(self.at) {
                Some(b'=') => {
                    self.at += 1;
                    let v = self.value(depth)?;
                    out.insert(key, v);
                }
                Some(b'{') => {
                    self.at += 1;
                    let inner = self.items(depth + 1)?;
                    self.skip();
                    if self.b.get(self.at) != Some(&b'}') {
                        return Err(format!("section {key} does not end"));
                    }
                    self.at += 1;
                    out.insert(key, Value::Section(inner));
                }
                _ => return Err(format!("= or {{ expected after {key}")),
            }
        }
    }

    fn value(&mut self, depth: usize) -> std::result::Result<Value, String> {
        self.skip();
        match self.b.get(self.at) {
            Some(b'"') => {
                self.at += 1;
                let mut s = Vec::new();
                loop {
                    match self.b.get(self.at) {
                        None => return Err("a string does not end".into()),
                        Some(b'"') => {
                            self.at += 1;
                            return Ok(Value::Str(String::from_utf8_lossy(&s).into_owned()));
                        }
                        Some(b'\\') => {
                            s.extend(self.b.get(self.at + 1));
                            self.at += 2;
                        }
                        Some(&c) => {
                            s.push(c);
                            self.at += 1;
                        }
                    }
                }
            }
            Some(b'[') => {
                if depth > MAX_DEPTH {
                    return Err("lists nested too deep".into());
                }
                self.at += 1;
                let mut items = Vec::new();
                loop {
                    self.skip();
                    match self.b.get(self.at) {
                        Some(b']') => {
                            self.at += 1;
                            return Ok(Value::List(items));
                        }
                        Some(b',') => self.at += 1,
                        None => return Err("a list does not end".into()),
                        _ => items.push(self.value(depth + 1)?),
                    }
                }
            }
            _ => {
                let w = self
                    .word()
                    .ok_or_else(|| format!("a value expected at byte {}", self.at))?;
                w.parse::<i64>()
                    .map(Value::Num)
                    .or_else(|_| w.parse::<f64>().map(|f| Value::Num(f as i64)))
                    .map_err(|_| format!("{w:?} is not a value"))
            }
        }
    }
}

/// The linear logical volumes of the volume group in `text` on the PV with `uuid` (32
/// characters, no dashes) of `pv_size` bytes.
fn logical_volumes(text: &str, uuid: &str, pv_size: u64) -> Result<Vec<LogicalVolume>> {
    let top = parse(text).map_err(|e| corrupt(format!("its metadata text: {e}")))?;
    let Some((vg_name, vg)) = top
        .iter()
        .find(|(_, v)| matches!(v, Value::Section(_)) && v.get("extent_size").is_some())
    else {
        return Err(corrupt("its metadata names no volume group".into()));
    };
    let extent = vg
        .num("extent_size")
        .filter(|&n| n > 0)
        .ok_or_else(|| corrupt(format!("volume group {vg_name} has no extent size")))?
        as u64
        * 512;
    // This PV's name in the metadata (pv0, ...), and where its extents start.
    let mut this = None;
    if let Some(pvs) = vg.get("physical_volumes") {
        for (name, pv) in pvs.sections() {
            if pv.text("id").map(|id| id.replace('-', "")) == Some(uuid.to_string()) {
                this = Some((
                    name.clone(),
                    pv.num("pe_start").unwrap_or(0).max(0) as u64 * 512,
                ));
            }
        }
    }
    let Some((pv_name, pe_start)) = this else {
        return Err(corrupt(format!(
            "the metadata of volume group {vg_name} does not list this physical volume"
        )));
    };
    let mut out = Vec::new();
    let Some(lvs) = vg.get("logical_volumes") else {
        return Ok(out);
    };
    for (name, lv) in lvs.sections() {
        let mut map = Vec::new();
        let mut why = None;
        let mut size = 0u64;
        let mut segments: Vec<&Value> = lv
            .sections()
            .filter(|(k, _)| k.starts_with("segment"))
            .map(|(_, v)| v)
            .collect();
        segments.sort_by_key(|s| s.num("start_extent").unwrap_or(0));
        for seg in segments {
            let (start, count) = (
                seg.num("start_extent").unwrap_or(-1),
                seg.num("extent_count").unwrap_or(-1),
            );
            if start < 0 || count <= 0 {
                why = Some("a segment without extents".to_string());
                break;
            }
            let (start, count) = (start as u64, count as u64);
            let linear = seg.text("type") == Some("striped") && seg.num("stripe_count") == Some(1);
            if !linear {
                why = Some(format!(
                    "a {} segment (only linear logical volumes are read)",
                    seg.text("type").unwrap_or("?")
                ));
                break;
            }
            let (on, pe) = match seg.get("stripes") {
                Some(Value::List(l)) => match (l.first(), l.get(1)) {
                    (Some(Value::Str(pv)), Some(Value::Num(pe))) if *pe >= 0 => (pv, *pe as u64),
                    _ => (&String::new(), 0),
                },
                _ => (&String::new(), 0),
            };
            if *on != pv_name {
                why = Some(format!("extents on another physical volume ({on})"));
                break;
            }
            let (lv_at, pv_at, len) = (
                start.checked_mul(extent),
                pe.checked_mul(extent).and_then(|x| x.checked_add(pe_start)),
                count.checked_mul(extent),
            );
            match (lv_at, pv_at, len) {
                (Some(lv_at), Some(pv_at), Some(len))
                    if lv_at == size && pv_at.checked_add(len).is_some_and(|e| e <= pv_size) =>
                {
                    map.push((lv_at, pv_at, len));
                    size += len;
                }
                _ => {
                    why = Some("a segment outside the physical volume or out of order".into());
                    break;
                }
            }
        }
        out.push(LogicalVolume {
            vg: vg_name.clone(),
            name: name.clone(),
            size,
            map: match why {
                None => Ok(map),
                Some(w) => Err(w),
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"vg0 {
        id = "x"
        seqno = 4
        extent_size = 8192	# 4 Megabytes
        physical_volumes {
            pv0 { id = "abcd-ef" device = "/dev/sda2" pe_start = 2048 pe_count = 100 }
        }
        logical_volumes {
            root {
                segment_count = 2
                segment1 { start_extent = 0 extent_count = 2 type = "striped" stripe_count = 1 stripes = [ "pv0", 10 ] }
                segment2 { start_extent = 2 extent_count = 1 type = "striped" stripe_count = 1 stripes = [ "pv0", 0 ] }
            }
            thin { segment1 { start_extent = 0 extent_count = 1 type = "thin" } }
            other { segment1 { start_extent = 0 extent_count = 1 type = "striped" stripe_count = 1 stripes = [ "pv1", 0 ] } }
        }
    }
    contents = "Text Format Volume Group"
    "#;

    #[test]
    fn linear_volumes_map_their_extents_and_others_say_why_not() {
        let lvs = logical_volumes(TEXT, "abcdef", 1 << 30).unwrap();
        let by: BTreeMap<&str, &LogicalVolume> = lvs.iter().map(|l| (l.name.as_str(), l)).collect();
        let e = 4 << 20;
        assert_eq!(
            by["root"].map,
            Ok(vec![(0, (1 << 20) + 10 * e, 2 * e), (2 * e, 1 << 20, e)])
        );
        assert_eq!(by["root"].size, 3 * e);
        assert!(by["thin"].map.as_ref().unwrap_err().contains("thin"));
        assert!(by["other"].map.as_ref().unwrap_err().contains("pv1"));
        assert_eq!(by["root"].vg, "vg0");
    }

    #[test]
    fn broken_text_is_an_error_not_a_panic() {
        for bad in [
            "vg0 {",
            "vg0 { a = [ 1, ",
            "a = \"x",
            "{",
            "vg0 { extent_size = 0 }",
        ] {
            assert!(logical_volumes(bad, "abcdef", 1 << 30).is_err(), "{bad}");
        }
        let deep = "a { ".repeat(100);
        assert!(parse(&deep).is_err());
        // Extents past the end of the PV are refused.
        let lvs = logical_volumes(TEXT, "abcdef", 8 << 20).unwrap();
        assert!(lvs.iter().find(|l| l.name == "root").unwrap().map.is_err());
    }
}
