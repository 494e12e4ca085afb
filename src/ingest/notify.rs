//! What a finished nightly run tells the outside world: the job's `notify_command` (the run's
//! JSON status on its standard input), an e-mail through the local `sendmail` (as ghettoVCB's
//! log e-mails), and a Prometheus text file for node_exporter's textfile collector
//! (`metrics_file`). None of them changes the outcome of the backups; a failure is reported in
//! the run's status.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::ingest::job::RunReport;

/// How long a notification command or sendmail may run before it is killed: a notification
/// must never keep the night's job from ending.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// When the e-mail is sent.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum When {
    /// After every run.
    #[default]
    Always,
    /// Only after a run that did not fully succeed.
    Failure,
}

/// The job file's `[email]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Email {
    /// Recipients.
    pub to: Vec<String>,
    /// Sender (default `vmrepo@HOSTNAME`).
    pub from: Option<String>,
    /// The sendmail program (default `/usr/sbin/sendmail`), run as `sendmail -t -oi`.
    #[serde(default = "default_sendmail")]
    pub sendmail: PathBuf,
    /// `always` (default) or `failure`.
    #[serde(default)]
    pub when: When,
}

fn default_sendmail() -> PathBuf {
    PathBuf::from("/usr/sbin/sendmail")
}

impl Email {
    /// Refuses an `[email]` table that could not send anything, or could forge headers.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.to.is_empty() {
            return Err("[email] needs at least one address in `to`".into());
        }
        for a in self.to.iter().chain(&self.from) {
            if a.trim().is_empty() || a.contains(['\r', '\n', ',']) {
                return Err(format!(
                    "[email]: {a:?} is not one address (no commas or line breaks)"
                ));
            }
        }
        Ok(())
    }
}

/// This host's name.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Runs `program args` with `input` on its standard input, killing it (its whole process
/// group) after [`TIMEOUT`]. Fails, saying why, unless it exits 0.
fn feed(what: &str, mut cmd: Command, input: Vec<u8>) -> Result<()> {
    let fail = |why: String| Error::Hook(format!("{what}: {why}"));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot start it: {e}")))?;
    let mut stdin = child.stdin.take().expect("piped");
    // A reader that stops early must not block the writer forever: write from a thread.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let began = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if began.elapsed() >= TIMEOUT => {
                // SAFETY: kill(2) on the child's own process group; no memory is involved.
                unsafe {
                    libc::kill(-(child.id() as i32), libc::SIGKILL);
                }
                let _ = child.wait();
                let _ = writer.join();
                return Err(fail(format!(
                    "ran longer than {} s and was killed",
                    TIMEOUT.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(fail(format!("cannot wait for it: {e}"))),
        }
    };
    let _ = writer.join();
    if !status.success() {
        return Err(fail(match status.code() {
            Some(c) => format!("exited with status {c}"),
            None => "was killed by a signal".into(),
        }));
    }
    Ok(())
}

/// Runs the job's `notify_command` (`sh -c`) with the run's JSON status on its standard input
/// and `VMREPO_STATUS` = `ok` or `failed`.
pub fn run_command(command: &str, report: &RunReport) -> Result<()> {
    let json = serde_json::to_vec_pretty(report).expect("serializable");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env("VMREPO_STATUS", if report.ok { "ok" } else { "failed" });
    feed(&format!("notify_command {command:?}"), cmd, json)
}

/// The plain-text summary a person reads: one block per VM, then retention, copies, check.
pub fn summary(report: &RunReport) -> String {
    let mut out = String::new();
    let line = |out: &mut String, s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(
        &mut out,
        format!(
            "vmrepo run on {}: {} ({} to {})",
            hostname(),
            if report.ok { "OK" } else { "FAILED" },
            report.started,
            report.finished
        ),
    );
    line(&mut out, format!("repository: {}", report.repository));
    line(&mut out, String::new());
    for v in &report.vms {
        match &v.report {
            Some(r) => line(
                &mut out,
                format!(
                    "{:6}  {}  read {} B, new {} B, stored {} B, {:.1} s",
                    v.status,
                    r.generation,
                    r.stats.bytes_read,
                    r.stats.bytes_new,
                    r.stats.bytes_stored,
                    v.seconds
                ),
            ),
            None => line(
                &mut out,
                format!("{:6}  {}  {:.1} s", v.status, v.path, v.seconds),
            ),
        }
        if let Some(e) = &v.error {
            line(&mut out, format!("        error: {e}"));
        }
    }
    line(&mut out, String::new());
    line(
        &mut out,
        format!(
            "retention: {} ({} generation(s) removed, {} B freed)",
            report.retention, report.removed, report.freed
        ),
    );
    for c in &report.copies {
        line(&mut out, format!("copy: {c}"));
    }
    line(&mut out, format!("check: {}", report.check));
    out
}

/// Sends the summary by e-mail through `sendmail -t -oi` (recipients from the headers).
pub fn send_email(email: &Email, report: &RunReport) -> Result<()> {
    let host = hostname();
    let from = email
        .from
        .clone()
        .unwrap_or_else(|| format!("vmrepo@{host}"));
    let failed = report.vms.iter().filter(|v| v.status != "ok").count();
    let subject = format!(
        "vmrepo: {} on {host}: {} VM(s), {failed} failed",
        if report.ok { "OK" } else { "FAILED" },
        report.vms.len()
    );
    let date = jiff::Zoned::now().strftime("%a, %d %b %Y %H:%M:%S %z");
    let message = format!(
        "From: {from}\r\nTo: {}\r\nSubject: {}\r\nDate: {date}\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{}",
        email.to.join(", "),
        subject.replace(['\r', '\n'], " "),
        summary(report).replace('\n', "\r\n")
    );
    let mut cmd = Command::new(&email.sendmail);
    cmd.args(["-t", "-oi"]);
    feed(
        &format!("e-mail through {}", email.sendmail.display()),
        cmd,
        message.into_bytes(),
    )
}

/// Seconds since the epoch of a report time (`YYYY-MM-DDTHH:MM:SSZ`).
fn epoch(time: &str) -> Option<i64> {
    time.parse::<jiff::Timestamp>().ok().map(|t| t.as_second())
}

/// A label value, escaped as the text format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The `*_last_success_timestamp_seconds` samples of an earlier metrics file, by their labels:
/// a VM that fails tonight keeps the time it last succeeded.
fn earlier_successes(path: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return out;
    };
    for l in text.lines() {
        if let Some((series, value)) = l.rsplit_once(' ') {
            if series.contains("_last_success_timestamp_seconds") {
                out.insert(series.to_string(), value.to_string());
            }
        }
    }
    out
}

/// Writes the run's metrics in the Prometheus text format to `path`, atomically (the textfile
/// collector must never read half a file).
pub fn write_metrics(path: &Path, report: &RunReport) -> Result<()> {
    let earlier = earlier_successes(path);
    let repo = label(&report.repository);
    let finished = epoch(&report.finished).unwrap_or(0);
    let started = epoch(&report.started).unwrap_or(finished);
    let mut out = String::new();
    let mut family = |name: &str, help: &str, samples: Vec<(String, String)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for (labels, value) in samples {
            out.push_str(&format!("{name}{{{labels}}} {value}\n"));
        }
    };
    let run_labels = format!("repository=\"{repo}\"");
    let last = |labels: &str, name: &str, ok: bool, at: i64| -> (String, String) {
        let series = format!("{name}{{{labels}}}");
        let value = if ok {
            at.to_string()
        } else {
            earlier.get(&series).cloned().unwrap_or_else(|| "0".into())
        };
        (labels.to_string(), value)
    };
    family(
        "vmrepo_run_ok",
        "1 when the last run of the job succeeded (every VM, retention, copies, check).",
        vec![(run_labels.clone(), u8::from(report.ok).to_string())],
    );
    family(
        "vmrepo_run_finished_timestamp_seconds",
        "When the last run ended.",
        vec![(run_labels.clone(), finished.to_string())],
    );
    family(
        "vmrepo_run_last_success_timestamp_seconds",
        "When a run last succeeded (0: never, as far as this file knows).",
        vec![last(
            &run_labels,
            "vmrepo_run_last_success_timestamp_seconds",
            report.ok,
            finished,
        )],
    );
    family(
        "vmrepo_run_duration_seconds",
        "How long the last run took.",
        vec![(run_labels.clone(), (finished - started).to_string())],
    );
    family(
        "vmrepo_run_removed_generations",
        "Generations the last run's retention removed.",
        vec![(run_labels.clone(), report.removed.to_string())],
    );
    family(
        "vmrepo_run_freed_bytes",
        "Bytes the last run's gc returned to the filesystem.",
        vec![(run_labels.clone(), report.freed.to_string())],
    );
    let vms: Vec<(String, &crate::ingest::job::VmOutcome)> = report
        .vms
        .iter()
        .map(|v| {
            let name = v
                .report
                .as_ref()
                .and_then(|r| r.generation.split_once('@').map(|(vm, _)| vm.to_string()))
                .unwrap_or_else(|| crate::ingest::job::JobFile::key_of(Path::new(&v.path)));
            (format!("{run_labels},vm=\"{}\"", label(&name)), v)
        })
        .collect();
    let per_vm = |f: &dyn Fn(&crate::ingest::job::VmOutcome) -> String| -> Vec<(String, String)> {
        vms.iter().map(|(l, v)| (l.clone(), f(v))).collect()
    };
    family(
        "vmrepo_vm_ok",
        "1 when the VM's last ingest succeeded.",
        per_vm(&|v| u8::from(v.status == "ok").to_string()),
    );
    family(
        "vmrepo_vm_last_success_timestamp_seconds",
        "When the VM was last backed up successfully (0: never, as far as this file knows).",
        vms.iter()
            .map(|(l, v)| {
                last(
                    l,
                    "vmrepo_vm_last_success_timestamp_seconds",
                    v.status == "ok",
                    finished,
                )
            })
            .collect(),
    );
    family(
        "vmrepo_vm_duration_seconds",
        "How long the VM's last ingest took, hooks included.",
        per_vm(&|v| format!("{:.3}", v.seconds)),
    );
    let stat = |f: fn(&crate::repo::manifest::IngestStats) -> u64| {
        move |v: &crate::ingest::job::VmOutcome| {
            v.report.as_ref().map_or(0, |r| f(&r.stats)).to_string()
        }
    };
    family(
        "vmrepo_vm_read_bytes",
        "Bytes the VM's last ingest read.",
        per_vm(&stat(|s| s.bytes_read)),
    );
    family(
        "vmrepo_vm_new_bytes",
        "Bytes of data the repository did not hold yet, before compression.",
        per_vm(&stat(|s| s.bytes_new)),
    );
    family(
        "vmrepo_vm_stored_bytes",
        "Bytes the VM's last ingest added to the repository.",
        per_vm(&stat(|s| s.bytes_stored)),
    );
    crate::fsutil::write_atomic(path, out.as_bytes())
}
