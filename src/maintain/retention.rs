//! Retention policies: which generations a policy keeps, and why.
//!
//! Pure logic over generation times; `prune` applies the result to a repository. The rules
//! follow restic and borg where they agree (see docs/RETENTION.md):
//!
//! * a generation is kept if any rule keeps it;
//! * `keep_last N` keeps the N newest;
//! * each bucket rule (hourly, daily, weekly = ISO week, monthly, yearly) walks the generations
//!   newest first and keeps the first one it meets in each new bucket, until it has kept N;
//! * `keep_within D` keeps every generation younger than D, measured back from the newest
//!   generation (not from now, so a VM whose backups stopped keeps its last ones).

use std::collections::BTreeMap;
use std::path::Path;

use jiff::tz::TimeZone;
use jiff::{Span, Timestamp, Zoned};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// A retention policy. All counts zero and no `keep_within` keeps nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Policy {
    /// Keep the N newest generations.
    #[serde(default)]
    pub keep_last: u32,
    /// Keep the newest generation of each of the N most recent hours that have one.
    #[serde(default)]
    pub keep_hourly: u32,
    /// ... days.
    #[serde(default)]
    pub keep_daily: u32,
    /// ... ISO weeks (Monday to Sunday, numbered by ISO 8601 week-year).
    #[serde(default)]
    pub keep_weekly: u32,
    /// ... months.
    #[serde(default)]
    pub keep_monthly: u32,
    /// ... years.
    #[serde(default)]
    pub keep_yearly: u32,
    /// Keep everything younger than this (`10d`, `2w`, `1y6m`, `36h`) relative to the newest.
    #[serde(default)]
    pub keep_within: Option<KeepWithin>,
}

/// A `keep_within` duration in calendar units, as written by the user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeepWithin {
    text: String,
    span: SpanParts,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SpanParts {
    years: i64,
    months: i64,
    weeks: i64,
    days: i64,
    hours: i64,
}

impl KeepWithin {
    /// Parses `1y2m3w4d5h` (any subset, in that order; `m` is months).
    pub fn parse(s: &str) -> std::result::Result<KeepWithin, String> {
        let bad = || {
            format!(
                "bad duration {s:?}: use a number and a unit, several in a row: y (years), m (months), \
                 w (weeks), d (days), h (hours), e.g. 10d, 2w, 1y6m, 36h"
            )
        };
        let mut parts = SpanParts::default();
        let mut num = String::new();
        let mut seen = String::new();
        for c in s.trim().chars() {
            if c.is_ascii_digit() {
                num.push(c);
                continue;
            }
            let n: i64 = num.parse().map_err(|_| bad())?;
            num.clear();
            // No backup is older than 1000 years; past that, the date arithmetic overflows.
            let most = match c {
                'y' => 1_000,
                'm' => 12_000,
                'w' => 52_000,
                'd' => 365_000,
                'h' => 8_760_000,
                _ => return Err(bad()),
            };
            if n > most {
                return Err(format!(
                    "duration {s:?} is too long: at most 1000 years ({most}{c})"
                ));
            }
            let slot = match c {
                'y' => &mut parts.years,
                'm' => &mut parts.months,
                'w' => &mut parts.weeks,
                'd' => &mut parts.days,
                'h' => &mut parts.hours,
                _ => return Err(bad()),
            };
            if seen.contains(c) {
                return Err(bad());
            }
            seen.push(c);
            *slot = n;
        }
        if !num.is_empty() || seen.is_empty() {
            return Err(bad());
        }
        Ok(KeepWithin {
            text: s.trim().to_string(),
            span: parts,
        })
    }

    fn span(&self) -> Span {
        let p = self.span;
        Span::new()
            .years(p.years)
            .months(p.months)
            .weeks(p.weeks)
            .days(p.days)
            .hours(p.hours)
    }

    /// True for a zero duration (keeps nothing).
    pub fn is_zero(&self) -> bool {
        self.span == SpanParts::default()
    }
}

impl TryFrom<String> for KeepWithin {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        KeepWithin::parse(&s)
    }
}

impl From<KeepWithin> for String {
    fn from(k: KeepWithin) -> String {
        k.text
    }
}

impl std::fmt::Display for KeepWithin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Policy {
    /// True if the policy keeps nothing at all.
    pub fn is_empty(&self) -> bool {
        self.keep_last == 0
            && self.keep_hourly == 0
            && self.keep_daily == 0
            && self.keep_weekly == 0
            && self.keep_monthly == 0
            && self.keep_yearly == 0
            && self.keep_within.as_ref().is_none_or(|w| w.is_zero())
    }

    /// A one-line description (`last 3, daily 7, within 10d`).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (n, label) in [
            (self.keep_last, "last"),
            (self.keep_hourly, "hourly"),
            (self.keep_daily, "daily"),
            (self.keep_weekly, "weekly"),
            (self.keep_monthly, "monthly"),
            (self.keep_yearly, "yearly"),
        ] {
            if n > 0 {
                parts.push(format!("{label} {n}"));
            }
        }
        if let Some(w) = &self.keep_within {
            parts.push(format!("within {w}"));
        }
        if parts.is_empty() {
            "keep nothing".into()
        } else {
            parts.join(", ")
        }
    }
}

/// The verdict for one generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The generation time as given.
    pub time: Timestamp,
    /// Kept by at least one rule.
    pub keep: bool,
    /// The rules that kept it, e.g. `daily #1`, `within 10d`.
    pub reasons: Vec<String>,
}

/// Applies `policy` to generation times (any order); returns verdicts newest first. Buckets are
/// computed in `tz` (UTC unless the user asks for local time).
pub fn apply(policy: &Policy, times: &[Timestamp], tz: &TimeZone) -> Vec<Verdict> {
    let mut sorted: Vec<Timestamp> = times.to_vec();
    sorted.sort_by(|a, b| b.cmp(a));
    let mut out: Vec<Verdict> = sorted
        .iter()
        .map(|&time| Verdict {
            time,
            keep: false,
            reasons: Vec::new(),
        })
        .collect();
    if out.is_empty() {
        return out;
    }
    let zoned: Vec<Zoned> = sorted.iter().map(|t| t.to_zoned(tz.clone())).collect();

    for (i, v) in out.iter_mut().enumerate().take(policy.keep_last as usize) {
        v.reasons.push(format!("last #{}", i + 1));
    }
    type BucketKey = fn(&Zoned) -> (i32, i32, i32, i32);
    let rules: [(u32, &str, BucketKey); 5] = [
        (policy.keep_hourly, "hourly", |z| {
            (
                z.year() as i32,
                z.month() as i32,
                z.day() as i32,
                z.hour() as i32,
            )
        }),
        (policy.keep_daily, "daily", |z| {
            (z.year() as i32, z.month() as i32, z.day() as i32, 0)
        }),
        (policy.keep_weekly, "weekly", |z| {
            let w = z.date().iso_week_date();
            (w.year() as i32, w.week() as i32, 0, 0)
        }),
        (policy.keep_monthly, "monthly", |z| {
            (z.year() as i32, z.month() as i32, 0, 0)
        }),
        (policy.keep_yearly, "yearly", |z| (z.year() as i32, 0, 0, 0)),
    ];
    for (count, label, key) in rules {
        let mut kept = 0;
        let mut last = None;
        for (i, z) in zoned.iter().enumerate() {
            if kept >= count {
                break;
            }
            let k = key(z);
            if last != Some(k) {
                last = Some(k);
                kept += 1;
                out[i].reasons.push(format!("{label} #{kept}"));
            }
        }
    }
    if let Some(within) = policy.keep_within.as_ref().filter(|w| !w.is_zero()) {
        // Calendar arithmetic in the bucket zone; a duration reaching before year -9999 keeps all.
        let cutoff = zoned[0]
            .checked_sub(within.span())
            .map(|z| z.timestamp())
            .ok();
        for v in out.iter_mut() {
            if cutoff.is_none_or(|c| v.time > c) {
                v.reasons.push(format!("within {within}"));
            }
        }
    }
    for v in &mut out {
        v.keep = !v.reasons.is_empty();
    }
    out
}

/// A policy file: a default and per-VM policies (a VM's own section replaces the default).
///
/// ```toml
/// [default]
/// keep-daily = 7
/// keep-weekly = 4
///
/// [vm.web01]
/// keep-last = 3
/// keep-within = "10d"
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Applies to every VM without its own section.
    pub default: Option<Policy>,
    /// Per-VM policies by exact VM name.
    #[serde(default)]
    pub vm: BTreeMap<String, Policy>,
}

impl PolicyFile {
    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<PolicyFile> {
        let text = std::fs::read_to_string(path).ctx("read policy file", path)?;
        toml::from_str(&text).map_err(|e| Error::BadInput {
            path: path.to_path_buf(),
            reason: format!("not a valid retention policy file: {e}"),
        })
    }

    /// The policy for `vm`, if the file has one.
    pub fn for_vm(&self, vm: &str) -> Option<&Policy> {
        self.vm.get(vm).or(self.default.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn kept(policy: &Policy, times: &[&str], tz: &TimeZone) -> Vec<String> {
        let t: Vec<Timestamp> = times.iter().map(|s| ts(s)).collect();
        let mut k: Vec<String> = apply(policy, &t, tz)
            .into_iter()
            .filter(|v| v.keep)
            .map(|v| v.time.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
            .collect();
        k.sort();
        k
    }

    #[test]
    fn durations_parse_and_refuse_garbage() {
        assert!(KeepWithin::parse("10d").is_ok());
        assert!(KeepWithin::parse("1y6m").is_ok());
        assert!(KeepWithin::parse("2w3d12h").is_ok());
        for bad in ["", "10", "d", "10x", "1d1d", "-3d", "1.5d", "99999999999d"] {
            assert!(KeepWithin::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// `--keep-within 20000y` panicked in the date arithmetic (exit 101).
    #[test]
    fn huge_durations_are_refused_or_computed_without_panic() {
        let e = KeepWithin::parse("20000y").unwrap_err();
        assert!(e.contains("at most 1000 years"), "{e}");
        let most = KeepWithin::parse("1000y12000m52000w365000d8760000h").unwrap();
        let now = jiff::Timestamp::now().to_zoned(TimeZone::UTC);
        assert!(now.checked_sub(most.span()).is_ok());
    }

    #[test]
    fn empty_policy_keeps_nothing() {
        let p = Policy::default();
        assert!(p.is_empty());
        assert!(kept(&p, &["2026-01-01T00:00:00Z"], &TimeZone::UTC).is_empty());
    }

    #[test]
    fn daily_keeps_newest_of_each_day() {
        let p = Policy {
            keep_daily: 2,
            ..Default::default()
        };
        let times = [
            "2026-03-01T01:00:00Z",
            "2026-03-01T23:00:00Z",
            "2026-03-02T01:00:00Z",
            "2026-03-02T05:00:00Z",
            "2026-03-03T01:00:00Z",
        ];
        assert_eq!(
            kept(&p, &times, &TimeZone::UTC),
            ["2026-03-02T05:00:00Z", "2026-03-03T01:00:00Z"]
        );
    }

    #[test]
    fn month_ends_and_leap_day() {
        // Nightly at 01:00 from 2028-01-25 to 2028-03-05 (2028 is a leap year).
        let mut times = Vec::new();
        let mut d = jiff::civil::date(2028, 1, 25);
        while d <= jiff::civil::date(2028, 3, 5) {
            times.push(format!("{d}T01:00:00Z"));
            d = d.tomorrow().unwrap();
        }
        let refs: Vec<&str> = times.iter().map(|s| s.as_str()).collect();
        let p = Policy {
            keep_monthly: 3,
            ..Default::default()
        };
        assert_eq!(
            kept(&p, &refs, &TimeZone::UTC),
            [
                "2028-01-31T01:00:00Z",
                "2028-02-29T01:00:00Z",
                "2028-03-05T01:00:00Z"
            ]
        );
        // keep-within 1m of 2028-03-05T01:00 reaches back to 2028-02-05T01:00 (exclusive).
        let p = Policy {
            keep_within: Some(KeepWithin::parse("1m").unwrap()),
            ..Default::default()
        };
        let k = kept(&p, &refs, &TimeZone::UTC);
        assert_eq!(k.first().unwrap(), "2028-02-06T01:00:00Z");
        assert_eq!(k.len(), 29);
    }

    #[test]
    fn iso_week_53_is_its_own_bucket() {
        // 2026-12-28 (Mon) .. 2027-01-03 (Sun) is ISO week 2026-W53; 2027-01-04 starts 2027-W01.
        let times = [
            "2026-12-27T10:00:00Z", // Sunday of 2026-W52
            "2026-12-28T10:00:00Z",
            "2027-01-01T10:00:00Z",
            "2027-01-03T10:00:00Z", // newest of 2026-W53
            "2027-01-04T10:00:00Z", // 2027-W01
        ];
        let p = Policy {
            keep_weekly: 3,
            ..Default::default()
        };
        assert_eq!(
            kept(&p, &times, &TimeZone::UTC),
            [
                "2026-12-27T10:00:00Z",
                "2027-01-03T10:00:00Z",
                "2027-01-04T10:00:00Z"
            ]
        );
        // Yearly goes by calendar year, not ISO year.
        let p = Policy {
            keep_yearly: 2,
            ..Default::default()
        };
        assert_eq!(
            kept(&p, &times, &TimeZone::UTC),
            ["2026-12-28T10:00:00Z", "2027-01-04T10:00:00Z"]
        );
    }

    #[test]
    fn local_time_buckets_follow_the_zone_across_dst() {
        let berlin =
            TimeZone::get("Europe/Berlin").expect("tzdata installed (apt-get install tzdata)");
        // 2026-10-25: Berlin falls back from CEST (UTC+2) to CET (UTC+1) at 03:00 local.
        let times = [
            "2026-10-24T22:30:00Z", // 2026-10-25 00:30 CEST
            "2026-10-25T00:30:00Z", // 02:30 CEST
            "2026-10-25T01:30:00Z", // 02:30 CET: the same local hour again
            "2026-10-25T22:30:00Z", // 2026-10-25 23:30 CET
            "2026-10-25T23:30:00Z", // 2026-10-26 00:30 CET
        ];
        let daily = Policy {
            keep_daily: 3,
            ..Default::default()
        };
        // In UTC the days are 10-24, 10-25 (newest 23:30); in Berlin 10-25 and 10-26.
        assert_eq!(
            kept(&daily, &times, &TimeZone::UTC),
            ["2026-10-24T22:30:00Z", "2026-10-25T23:30:00Z"]
        );
        assert_eq!(
            kept(&daily, &times, &berlin),
            ["2026-10-25T22:30:00Z", "2026-10-25T23:30:00Z"]
        );
        // The repeated local hour 02:xx is one hourly bucket in Berlin, two in UTC.
        let hourly = Policy {
            keep_hourly: 10,
            ..Default::default()
        };
        assert_eq!(kept(&hourly, &times, &berlin).len(), 4);
        assert_eq!(kept(&hourly, &times, &TimeZone::UTC).len(), 5);
    }

    #[test]
    fn reasons_name_every_rule() {
        let p = Policy {
            keep_last: 1,
            keep_daily: 1,
            keep_weekly: 1,
            keep_within: Some(KeepWithin::parse("1d").unwrap()),
            ..Default::default()
        };
        let v = apply(&p, &[ts("2026-11-22T01:00:03Z")], &TimeZone::UTC);
        assert_eq!(
            v[0].reasons,
            ["last #1", "daily #1", "weekly #1", "within 1d"]
        );
    }

    /// Property: a policy with keep-last >= N keeps a superset of keep-last N alone, and any
    /// non-empty policy keeps at least the newest generation.
    #[test]
    fn property_superset_of_keep_last_and_never_empty() {
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = |m: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % m
        };
        for _ in 0..2000 {
            let n = 1 + next(60) as usize;
            let base = ts("2024-01-01T00:00:00Z").as_second();
            let mut times: Vec<Timestamp> = (0..n)
                .map(|_| Timestamp::from_second(base + next(3 * 365 * 86400) as i64).unwrap())
                .collect();
            times.sort();
            times.dedup();
            let p = Policy {
                keep_last: next(5) as u32,
                keep_hourly: next(3) as u32,
                keep_daily: next(8) as u32,
                keep_weekly: next(5) as u32,
                keep_monthly: next(13) as u32,
                keep_yearly: next(3) as u32,
                keep_within: match next(4) {
                    0 => Some(KeepWithin::parse(&format!("{}d", next(40))).unwrap()),
                    _ => None,
                },
            };
            let verdicts = apply(&p, &times, &TimeZone::UTC);
            let keep: Vec<bool> = verdicts.iter().map(|v| v.keep).collect();
            for small in 0..=p.keep_last {
                let last_only = Policy {
                    keep_last: small,
                    ..Default::default()
                };
                for (a, b) in apply(&last_only, &times, &TimeZone::UTC).iter().zip(&keep) {
                    assert!(
                        !a.keep || *b,
                        "policy {p:?} dropped a keep-last {small} generation"
                    );
                }
            }
            if !p.is_empty() {
                assert!(keep[0], "policy {p:?} dropped the newest generation");
            } else {
                assert!(keep.iter().all(|k| !k));
            }
        }
    }
}
