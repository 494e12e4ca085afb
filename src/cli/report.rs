//! `vmrepo report --html FILE`: one self-contained HTML page (inline SVG charts, no network at
//! view time) for an operator: stored bytes per night per VM, the repository's growth, what each
//! night read against what it stored, ingest durations, each VM's last backup, and the last
//! job run's status and check when its status file is given.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use vmrepo::repo::lock::LockMode;

use crate::cli::context::Context;
use crate::cli::output::{human, Bar};

pub const HELP: &str = "Write a self-contained HTML report of the repository (inline charts, \
nothing fetched when it is viewed): stored bytes per night per VM, the repository's growth, bytes \
read against bytes stored per night, ingest durations, and each VM's last backup with its age. \
With --status FILE (a `vmrepo run` status file) it also shows the last run's result per VM, its \
retention, copies and check. Built from the index; fast and small for years of nightly data.";

/// `vmrepo report` arguments.
#[derive(Args)]
pub struct ReportArgs {
    /// Repository directory.
    repo: PathBuf,
    /// Where to write the page.
    #[arg(long, value_name = "FILE")]
    html: PathBuf,
    /// A `vmrepo run` status file (`status_file` of the job) to show the last run.
    #[arg(long, value_name = "FILE")]
    status: Option<PathBuf>,
}

/// Runs `vmrepo report`.
pub fn run(a: ReportArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let repo = ctx.open_repo(&a.repo, LockMode::Read, &Bar::new(false))?;
    let gens: Vec<Generation> = repo
        .with_index(|i| i.generations(None))?
        .into_iter()
        .map(|g| Generation {
            seconds: seconds(&g.started, &g.finished),
            vm: g.vm,
            time: g.time,
            bytes_read: g.bytes_read,
            bytes_stored: g.bytes_stored,
            damaged: g.damaged,
        })
        .collect();
    let status = match &a.status {
        Some(p) => Some(
            std::fs::read(p)
                .with_context(|| format!("cannot read the status file {}", p.display()))
                .and_then(|b| {
                    serde_json::from_slice::<serde_json::Value>(&b).with_context(|| {
                        format!("{} is not a vmrepo run status file (JSON)", p.display())
                    })
                })?,
        ),
        None => None,
    };
    let page = render(
        &a.repo.display().to_string(),
        &gens,
        status.as_ref(),
        jiff::Timestamp::now(),
    );
    vmrepo::fsutil::write_atomic(&a.html, page.as_bytes())
        .with_context(|| format!("cannot write the report {}", a.html.display()))?;
    println!(
        "wrote {} ({}, {} generation(s))",
        a.html.display(),
        human(page.len() as u64),
        gens.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// What the page shows of a generation.
pub struct Generation {
    vm: String,
    time: String,
    bytes_read: u64,
    bytes_stored: u64,
    /// How long its ingest took.
    seconds: Option<f64>,
    damaged: Option<String>,
}

/// Text made safe for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Colours for the VMs, in turn.
const COLOURS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

const W: f64 = 900.0;
const H: f64 = 260.0;
const LEFT: f64 = 80.0;
const BOTTOM: f64 = 30.0;

/// A chart's frame: axes, the y scale's top value and label, the first and last x labels.
fn frame(out: &mut String, id: &str, title: &str, y_max: f64, y_label: &str, x0: &str, x1: &str) {
    let _ = write!(
        out,
        r##"<h2>{title}</h2><svg id="{id}" class="chart" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{title}">
<line x1="{LEFT}" y1="10" x2="{LEFT}" y2="{yb}" stroke="#444"/><line x1="{LEFT}" y1="{yb}" x2="{W}" y2="{yb}" stroke="#444"/>
<text x="{lx}" y="16" text-anchor="end" class="axis">{top}</text><text x="{lx}" y="{yb}" text-anchor="end" class="axis">0</text>
<text x="{LEFT}" y="{xl}" class="axis">{x0}</text><text x="{W}" y="{xl}" text-anchor="end" class="axis">{x1}</text>
"##,
        yb = H - BOTTOM,
        lx = LEFT - 6.0,
        top = esc(&format!("{} {y_label}", fmt_num(y_max))),
        xl = H - 10.0,
        x0 = esc(x0),
        x1 = esc(x1),
    );
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Bytes in the unit that suits `max`: (divisor, unit name).
fn unit(max: f64) -> (f64, &'static str) {
    let mut d = 1.0;
    for u in ["B", "KiB", "MiB", "GiB", "TiB"] {
        if max / d < 1024.0 {
            return (d, u);
        }
        d *= 1024.0;
    }
    (d, "PiB")
}

/// Seconds between two report times, if both parse.
fn seconds(a: &str, b: &str) -> Option<f64> {
    let a: jiff::Timestamp = a.parse().ok()?;
    let b: jiff::Timestamp = b.parse().ok()?;
    Some((b.as_millisecond() - a.as_millisecond()) as f64 / 1000.0)
}

/// The page.
pub fn render(
    repo: &str,
    gens: &[Generation],
    status: Option<&serde_json::Value>,
    now: jiff::Timestamp,
) -> String {
    let mut vms: Vec<&str> = gens.iter().map(|g| g.vm.as_str()).collect();
    vms.sort_unstable();
    vms.dedup();
    let colour = |vm: &str| COLOURS[vms.binary_search(&vm).unwrap_or(0) % COLOURS.len()];
    // Nights: generations by UTC date, then VM.
    let mut nights: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    for g in gens {
        let day = g.time.get(..10).unwrap_or(&g.time);
        *nights.entry(day).or_default().entry(&g.vm).or_default() += g.bytes_stored;
    }
    let (first, last) = (
        nights.keys().next().copied().unwrap_or(""),
        nights.keys().next_back().copied().unwrap_or(""),
    );
    let mut out = String::with_capacity(64 << 10);
    let total_stored: u64 = gens.iter().map(|g| g.bytes_stored).sum();
    let _ = write!(
        out,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>vmrepo report: {r}</title>
<style>body{{font:14px sans-serif;margin:24px;color:#222}}h1{{font-size:20px}}h2{{font-size:16px;margin-top:28px}}
.axis{{font-size:11px;fill:#555}}table{{border-collapse:collapse}}td,th{{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}}
td.n{{text-align:right}}.ok{{color:#2a7d2a;font-weight:bold}}.bad{{color:#b22;font-weight:bold}}.key span{{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}}</style></head>
<body><h1>vmrepo report: {r}</h1><p id="summary">Made {now}. {n} generation(s) of {v} VM(s), {first} to {last}; ingests stored {stored} in all.</p>
"#,
        r = esc(repo),
        now = now.strftime("%Y-%m-%d %H:%M:%S UTC"),
        n = gens.len(),
        v = vms.len(),
        stored = esc(&human(total_stored)),
    );
    // Legend.
    out.push_str("<p class=\"key\">");
    for vm in &vms {
        let _ = write!(
            out,
            "<span style=\"background:{}\"></span>{}",
            colour(vm),
            esc(vm)
        );
    }
    out.push_str("</p>\n");

    // 1. Stored per night, stacked by VM.
    let max_night = nights
        .values()
        .map(|m| m.values().sum::<u64>())
        .max()
        .unwrap_or(0) as f64;
    let (div, u) = unit(max_night.max(1.0));
    frame(
        &mut out,
        "stored-per-night",
        "Stored per night",
        max_night / div,
        u,
        first,
        last,
    );
    let n = nights.len().max(1) as f64;
    let bar_w = ((W - LEFT) / n).max(1.0);
    let plot_h = H - BOTTOM - 10.0;
    for (k, (day, per_vm)) in nights.iter().enumerate() {
        let mut y = H - BOTTOM;
        for (vm, bytes) in per_vm {
            let h = if max_night > 0.0 {
                *bytes as f64 / max_night * plot_h
            } else {
                0.0
            };
            y -= h;
            let _ = writeln!(
                out,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{c}"><title>{t}</title></rect>"#,
                x = LEFT + k as f64 * bar_w,
                w = (bar_w * 0.85).max(0.5),
                c = colour(vm),
                t = esc(&format!("{day} {vm}: {}", human(*bytes))),
            );
        }
    }
    out.push_str("</svg>\n");

    // Lines over the generations in time order: growth, read÷stored, durations.
    let mut by_time: Vec<&Generation> = gens.iter().collect();
    by_time.sort_by(|a, b| a.time.cmp(&b.time));
    let line = |out: &mut String,
                id: &str,
                title: &str,
                unit_label: &str,
                series: Vec<(&str, Vec<f64>)>| {
        let max = series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .fold(0.0f64, f64::max);
        let count = series.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
        frame(out, id, title, max, unit_label, first, last);
        for (vm, values) in &series {
            let step = (W - LEFT) / (count.max(2) - 1) as f64;
            let points: Vec<String> = values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let y = if max > 0.0 { v / max * plot_h } else { 0.0 };
                    format!("{:.1},{:.1}", LEFT + i as f64 * step, H - BOTTOM - y)
                })
                .collect();
            let c = if *vm == "*" { "#333" } else { colour(vm) };
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"><title>{}</title></polyline>"#,
                points.join(" "),
                esc(vm)
            );
        }
        out.push_str("</svg>\n");
    };
    // 2. Growth: what ingests stored, cumulated.
    let total_max = total_stored as f64;
    let (gdiv, gunit) = unit(total_max.max(1.0));
    let mut cum = 0u64;
    let growth: Vec<f64> = by_time
        .iter()
        .map(|g| {
            cum += g.bytes_stored;
            cum as f64 / gdiv
        })
        .collect();
    line(
        &mut out,
        "growth",
        "Repository growth (what ingests stored, added up; prune and gc give some back)",
        gunit,
        vec![("*", growth)],
    );
    // 3. Read per byte stored, per VM.
    let per_vm = |f: &dyn Fn(&Generation) -> Option<f64>| -> Vec<(&str, Vec<f64>)> {
        vms.iter()
            .map(|vm| {
                (
                    *vm,
                    by_time
                        .iter()
                        .filter(|g| g.vm == *vm)
                        .map(|g| f(g).unwrap_or(0.0))
                        .collect(),
                )
            })
            .collect()
    };
    line(
        &mut out,
        "read-per-stored",
        "Bytes read per byte stored, per night (deduplication and compression together)",
        "x",
        per_vm(&|g| Some(g.bytes_read as f64 / g.bytes_stored.max(1) as f64)),
    );
    // 4. Durations.
    line(
        &mut out,
        "durations",
        "Ingest duration",
        "s",
        per_vm(&|g| g.seconds),
    );

    // 5. Each VM's last backup.
    out.push_str("<h2>Last backup per VM</h2><table id=\"last-backups\"><tr><th>VM</th><th>generations</th><th>newest</th><th>age</th><th>read</th><th>stored</th><th>state</th></tr>\n");
    for vm in &vms {
        let mine: Vec<&&Generation> = by_time.iter().filter(|g| g.vm == *vm).collect();
        let g = mine.last().expect("a listed VM has generations");
        let age = g
            .time
            .parse::<jiff::Timestamp>()
            .map(|t| (now.as_second() - t.as_second()) as f64 / 3600.0)
            .unwrap_or(f64::NAN);
        let state = match &g.damaged {
            Some(d) => format!("<span class=\"bad\">DAMAGED</span> {}", esc(d)),
            None => "<span class=\"ok\">ok</span>".into(),
        };
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{:.1} h</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{state}</td></tr>",
            esc(vm),
            mine.len(),
            esc(&g.time),
            age,
            esc(&human(g.bytes_read)),
            esc(&human(g.bytes_stored)),
        );
    }
    out.push_str("</table>\n");

    // 6. The last run, from its status file.
    if let Some(s) = status {
        let ok = s["ok"].as_bool().unwrap_or(false);
        let _ = writeln!(
            out,
            "<h2>Last run</h2><p id=\"last-run\">{} to {}: <span class=\"{}\">{}</span></p><table id=\"run-vms\"><tr><th>VM</th><th>status</th><th>seconds</th><th>error</th></tr>",
            esc(s["started"].as_str().unwrap_or("?")),
            esc(s["finished"].as_str().unwrap_or("?")),
            if ok { "ok" } else { "bad" },
            if ok { "ok" } else { "FAILED" }
        );
        for v in s["vms"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let st = v["status"].as_str().unwrap_or("?");
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td class=\"{}\">{}</td><td class=\"n\">{:.1}</td><td>{}</td></tr>",
                esc(v["path"].as_str().unwrap_or("?")),
                if st == "ok" { "ok" } else { "bad" },
                esc(st),
                v["seconds"].as_f64().unwrap_or(0.0),
                esc(v["error"].as_str().unwrap_or(""))
            );
        }
        let _ = writeln!(
            out,
            "</table><p id=\"check\">Retention: {}. Check: {}.</p>",
            esc(s["retention"].as_str().unwrap_or("?")),
            esc(s["check"].as_str().unwrap_or("?"))
        );
        for c in s["copies"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let _ = writeln!(out, "<p>Copy: {}</p>", esc(c.as_str().unwrap_or("?")));
        }
    }
    // For a browser test, and for a reader who wonders: the charts as laid out.
    out.push_str(
        "<script>addEventListener('load',function(){var c=document.querySelectorAll('svg.chart'),n=0;\
         c.forEach(function(s){var r=s.getBoundingClientRect();if(r.width>0&&r.height>0&&s.querySelector('rect,polyline'))n++;});\
         document.body.setAttribute('data-charts-rendered',n+'/'+c.length);});</script>\n</body></html>\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(vm: &str, day: u32, stored: u64) -> Generation {
        Generation {
            vm: vm.into(),
            time: format!("2026-{:02}-{:02}T01:00:00Z", 1 + day / 28, 1 + day % 28),
            bytes_read: 400 << 20,
            bytes_stored: stored,
            seconds: Some(30.0),
            damaged: None,
        }
    }

    /// A year of nights of ten VMs stays a small page; names are escaped.
    #[test]
    fn a_year_of_ten_vms_is_a_small_page() {
        let mut gens = Vec::new();
        for day in 0..336 {
            for v in 0..10 {
                gens.push(gen(&format!("vm{v}"), day, (20 + v) << 20));
            }
        }
        gens.push(gen("<script>", 1, 1));
        let page = render("/r", &gens, None, jiff::Timestamp::now());
        assert!(page.len() < 3 << 20, "{} bytes", page.len());
        assert!(!page.contains("<script>@"), "unescaped VM name");
        assert!(page.contains("&lt;script&gt;"));
        assert_eq!(page.matches("<svg").count(), 4);
    }
}
