//! Pre- and post-ingest commands: what freezes a VM before its disks are read (a VMware
//! snapshot over ssh, `virsh domfsfreeze`, a database flush) and thaws it afterwards.
//!
//! A command runs through `sh -c` in its own process group with `VMREPO_VM`, `VMREPO_VMDIR`
//! and `VMREPO_PHASE` (`pre` or `post`) in its environment, plus `VMREPO_STATUS` (`success`,
//! `failure` or `interrupted`) for the post-command. Its output goes to vmrepo's standard error
//! (never into `--json` output). A command that outlives its timeout is killed with its whole
//! process group.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};

/// Process group of the hook running now (0: none), so an interrupt can stop it.
static RUNNING: AtomicI32 = AtomicI32::new(0);

/// Set when the process is being interrupted: the signal handler runs the post-command, so
/// the ingest must not run it a second time.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Marks the process as interrupted (the caller runs the post-command and exits).
pub fn mark_interrupted() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// True once [`mark_interrupted`] was called.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Kills the hook that is running, if any (used when the ingest is interrupted).
pub fn kill_running() {
    let pgid = RUNNING.swap(0, Ordering::SeqCst);
    if pgid > 0 {
        // SAFETY: kill(2) on a process group this process started; no memory is involved.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// The commands around one VM's ingest.
#[derive(Clone, Debug, Default)]
pub struct Hooks {
    /// Runs before the VM is opened; failing aborts its ingest (no generation).
    pub pre: Option<String>,
    /// Runs afterwards whatever happened; its failure is reported.
    pub post: Option<String>,
    /// Longest either may run.
    pub timeout: Duration,
}

/// How a hook ended.
#[derive(Clone, Debug, Serialize)]
pub struct HookRun {
    /// `pre` or `post`.
    pub phase: String,
    /// The command.
    pub command: String,
    /// Exit status (None if killed by a signal or the timeout).
    pub status: Option<i32>,
    /// It ran past its timeout and was killed.
    pub timed_out: bool,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl HookRun {
    /// True when it exited with status 0.
    pub fn ok(&self) -> bool {
        self.status == Some(0) && !self.timed_out
    }

    /// The failure as an error naming the command and what happened.
    pub fn error(&self) -> Error {
        Error::Hook(format!(
            "{}-command {:?} {}",
            self.phase,
            self.command,
            if self.timed_out {
                format!(
                    "ran longer than its timeout and was killed after {:.0} s",
                    self.seconds
                )
            } else {
                match self.status {
                    Some(c) => format!("failed with exit status {c}"),
                    None => "was killed by a signal".into(),
                }
            }
        ))
    }
}

/// Runs `command` for `phase` with the VM's environment; waits at most `timeout`.
pub fn run(
    command: &str,
    phase: &str,
    vm: &str,
    vmdir: &Path,
    status: Option<&str>,
    timeout: Duration,
) -> Result<HookRun> {
    let began = Instant::now();
    let stderr = std::io::stderr();
    let out = std::os::fd::AsFd::as_fd(&stderr)
        .try_clone_to_owned()
        .map_err(|e| {
            Error::Hook(format!(
                "cannot pass standard error to the {phase}-command: {e}"
            ))
        })?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env("VMREPO_VM", vm)
        .env("VMREPO_VMDIR", vmdir)
        .env("VMREPO_PHASE", phase)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .process_group(0);
    if let Some(s) = status {
        cmd.env("VMREPO_STATUS", s);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Hook(format!("cannot start the {phase}-command {command:?}: {e}")))?;
    let pgid = child.id() as i32;
    RUNNING.store(pgid, Ordering::SeqCst);
    let _clear = ClearOnDrop(pgid);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                return Ok(HookRun {
                    phase: phase.into(),
                    command: command.into(),
                    status: st.code(),
                    timed_out: false,
                    seconds: began.elapsed().as_secs_f64(),
                })
            }
            Ok(None) => {}
            Err(e) => {
                return Err(Error::Hook(format!(
                    "cannot wait for the {phase}-command: {e}"
                )))
            }
        }
        if began.elapsed() >= timeout {
            // SAFETY: kill(2) on the child's own process group; no memory is involved.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            let _ = child.wait();
            return Ok(HookRun {
                phase: phase.into(),
                command: command.into(),
                status: None,
                timed_out: true,
                seconds: began.elapsed().as_secs_f64(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct ClearOnDrop(i32);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        let _ = RUNNING.compare_exchange(self.0, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_status_and_timeout() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("env");
        let cmd = format!(
            "echo \"$VMREPO_VM $VMREPO_PHASE $VMREPO_STATUS $VMREPO_VMDIR\" > {}",
            f.display()
        );
        let r = run(
            &cmd,
            "post",
            "web01",
            Path::new("/vm/web01"),
            Some("failure"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(r.ok());
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            "web01 post failure /vm/web01\n"
        );
        let r = run(
            "exit 3",
            "pre",
            "v",
            Path::new("/"),
            None,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(r.status, Some(3));
        assert!(r
            .error()
            .to_string()
            .contains("pre-command \"exit 3\" failed with exit status 3"));
        // A child of the hook that would outlive it is killed with it.
        let r = run(
            "sleep 30 & sleep 30",
            "pre",
            "v",
            Path::new("/"),
            None,
            Duration::from_millis(300),
        )
        .unwrap();
        assert!(r.timed_out && !r.ok());
        assert!(r.seconds < 10.0);
    }
}
