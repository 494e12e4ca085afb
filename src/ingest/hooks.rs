//! Pre- and post-ingest commands: what freezes a VM before its disks are read (a VMware
//! snapshot over ssh, `virsh domfsfreeze`, a database flush) and thaws it afterwards.
//!
//! A command runs through `sh -c` in its own process group with `VMREPO_VM`, `VMREPO_VMDIR`
//! and `VMREPO_PHASE` (`pre` or `post`) in its environment, plus `VMREPO_STATUS` (`success`,
//! `failure` or `interrupted`) for the post-command. Its output goes to vmrepo's standard error
//! (never into `--json` output). A command that outlives its timeout is killed with its whole
//! process group.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::shutdown::{Cleanup, OweCleanup, OwedCleanup as Owed};

/// The interrupt token: what an interrupt (SIGINT, SIGTERM, SIGHUP) must stop and run. The
/// command line makes one, gives a clone to every ingest through [`IngestOptions`] and one to
/// the thread that receives the signals, which calls [`Interrupt::interrupt`]. It tracks the
/// hooks running now (a job ingests several VMs at once) and the post-commands owed.
///
/// [`IngestOptions`]: crate::ingest::IngestOptions
#[derive(Clone, Default)]
pub struct Interrupt(Arc<InterruptState>);

#[derive(Default)]
struct InterruptState {
    /// The hooks running now.
    running: Mutex<Vec<RunningHook>>,
    /// Signalled each time a hook ends (an interrupt waits for the post-commands running).
    hook_ended: Condvar,
    /// Post-commands owed: registered when a VM's ingest with a post-command starts, taken
    /// back when its post-command runs. An interrupt takes them all and runs them.
    owed: Mutex<Vec<OwedPost>>,
    /// Set by [`Interrupt::interrupt`], which runs the owed post-commands, so no ingest may
    /// run its own.
    interrupted: AtomicBool,
    /// The next owed post-command's ticket.
    next: AtomicU64,
    /// Clean-ups owed (removing a snapshot vmrepo took on a vSphere host): taken back by
    /// whoever runs them first, the ingest or the interrupt.
    cleanups: Mutex<Vec<PendingCleanup>>,
}

/// A clean-up owed, and the ticket its guard takes it back by.
struct PendingCleanup {
    id: u64,
    what: String,
    run: Cleanup,
}

/// The guard of a clean-up owed to an [`Interrupt`] (see [`OweCleanup`]).
pub struct CleanupGuard {
    id: u64,
    interrupt: Interrupt,
}

impl Owed for CleanupGuard {
    fn run(self: Box<Self>) -> Option<std::result::Result<(), String>> {
        let taken = {
            let mut owed = self.interrupt.0.cleanups.lock().unwrap();
            if self.interrupt.is_interrupted() {
                None
            } else {
                owed.iter()
                    .position(|o| o.id == self.id)
                    .map(|i| owed.remove(i))
            }
        };
        taken.map(|o| (o.run)())
    }
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupt")
            .field("interrupted", &self.is_interrupted())
            .finish()
    }
}

/// A hook running now: its process group, and whether an interrupt kills it. A pre-command
/// is killed (the ingest it prepares will not run); a post-command is left to finish (it
/// thaws the VM or removes a snapshot), within its timeout.
struct RunningHook {
    pgid: i32,
    killed_by_interrupt: bool,
}

/// A post-command that must run whatever happens.
struct OwedPost {
    id: u64,
    command: String,
    vm: String,
    vmdir: PathBuf,
    timeout: Duration,
}

impl Interrupt {
    /// A token no interrupt has reached yet.
    pub fn new() -> Interrupt {
        Interrupt::default()
    }

    /// True once [`Interrupt::interrupt`] was called.
    pub fn is_interrupted(&self) -> bool {
        self.0.interrupted.load(Ordering::SeqCst)
    }

    /// Registers `command` as the post-command owed for `vm`: an interrupt runs it if the
    /// ingest cannot; [`OwedGuard::run`] runs it when the ingest ends.
    pub fn owe_post(&self, command: &str, vm: &str, vmdir: &Path, timeout: Duration) -> OwedGuard {
        let id = self.0.next.fetch_add(1, Ordering::SeqCst);
        self.0.owed.lock().unwrap().push(OwedPost {
            id,
            command: command.into(),
            vm: vm.into(),
            vmdir: vmdir.into(),
            timeout,
        });
        OwedGuard {
            id,
            interrupt: self.clone(),
        }
    }

    /// Takes back the owed post-command `id` so the caller runs it; `None` when an interrupt
    /// has taken it (and runs it).
    fn take_owed(&self, id: u64) -> Option<OwedPost> {
        let mut owed = self.0.owed.lock().unwrap();
        if self.is_interrupted() {
            return None;
        }
        let i = owed.iter().position(|o| o.id == id)?;
        Some(owed.remove(i))
    }

    /// Stops everything for an interrupt: marks the token interrupted, kills every running
    /// pre-command with its process group, then runs every owed post-command with
    /// `VMREPO_STATUS=interrupted`, all at once, and waits for them and for the post-commands
    /// ingests had already started. Returns what went wrong with the ones it ran. The caller
    /// then ends the process: no generation is recorded by an ingest that has not committed.
    pub fn interrupt(&self) -> Vec<String> {
        let (owed, cleanups): (Vec<OwedPost>, Vec<PendingCleanup>) = {
            let mut owed = self.0.owed.lock().unwrap();
            let mut cleanups = self.0.cleanups.lock().unwrap();
            self.0.interrupted.store(true, Ordering::SeqCst);
            (std::mem::take(&mut *owed), std::mem::take(&mut *cleanups))
        };
        let cleanup_threads: Vec<_> = cleanups
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    eprintln!("vmrepo: interrupted: {}", c.what);
                    (c.run)().err().map(|e| format!("{}: {e}", c.what))
                })
            })
            .collect();
        for hook in self.0.running.lock().unwrap().iter() {
            if hook.killed_by_interrupt {
                kill_group(hook.pgid);
            }
        }
        let handles: Vec<_> = owed
            .into_iter()
            .map(|o| {
                let me = self.clone();
                std::thread::spawn(move || {
                    match me.spawn_and_wait(
                        &o.command,
                        "post",
                        &o.vm,
                        &o.vmdir,
                        Some("interrupted"),
                        o.timeout,
                    ) {
                        Ok(r) if r.ok() => None,
                        Ok(r) => Some(format!("VM {}: {}", o.vm, r.error())),
                        Err(e) => Some(format!("VM {}: {e}", o.vm)),
                    }
                })
            })
            .collect();
        let errors = handles
            .into_iter()
            .filter_map(|h| {
                h.join()
                    .unwrap_or(Some("a post-command thread failed".into()))
            })
            .chain(
                cleanup_threads
                    .into_iter()
                    .filter_map(|h| h.join().unwrap_or(Some("a clean-up thread failed".into()))),
            )
            .collect();
        // The hooks still listed are post-commands ingests started before the interrupt (each
        // ends within its timeout) and the pre-commands killed above, which their waiting
        // threads reap within moments. The process must not end under them.
        let mut running = self.0.running.lock().unwrap();
        let finishing = running.iter().filter(|h| !h.killed_by_interrupt).count();
        if finishing > 0 {
            eprintln!(
                "vmrepo: interrupted: waiting for {finishing} post-command(s) already running to \
                 finish (each within its hook timeout)"
            );
        }
        while !running.is_empty() {
            running = self.0.hook_ended.wait(running).unwrap();
        }
        errors
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

/// The post-command owed for an ingest (see [`Interrupt::owe_post`]).
pub struct OwedGuard {
    id: u64,
    interrupt: Interrupt,
}

impl OwedGuard {
    /// Runs the post-command with `status`, unless an interrupt has taken it: then `None`
    /// (the interrupt runs it with status `interrupted`).
    pub fn run(self, status: &str) -> Option<Result<HookRun>> {
        let i = &self.interrupt;
        i.take_owed(self.id)
            .map(|o| i.spawn_and_wait(&o.command, "post", &o.vm, &o.vmdir, Some(status), o.timeout))
    }
}

impl OweCleanup for Interrupt {
    /// An interrupt runs `run` if the ingest cannot.
    fn owe_cleanup(&self, what: &str, run: Cleanup) -> Box<dyn Owed> {
        let id = self.0.next.fetch_add(1, Ordering::SeqCst);
        self.0.cleanups.lock().unwrap().push(PendingCleanup {
            id,
            what: what.into(),
            run,
        });
        Box::new(CleanupGuard {
            id,
            interrupt: self.clone(),
        })
    }
}

impl Interrupt {
    /// Runs `command` for `phase` with the VM's environment; waits at most `timeout`. Once
    /// interrupted, no new hook starts (the interrupt runs the owed post-commands).
    pub fn run_hook(
        &self,
        command: &str,
        phase: &str,
        vm: &str,
        vmdir: &Path,
        status: Option<&str>,
        timeout: Duration,
    ) -> Result<HookRun> {
        if self.is_interrupted() {
            return Err(Error::Hook(format!(
                "the {phase}-command was not started: vmrepo is being interrupted"
            )));
        }
        self.spawn_and_wait(command, phase, vm, vmdir, status, timeout)
    }

    /// Runs a hook, registered as running (so that an interrupt kills it) until it ends.
    fn spawn_and_wait(
        &self,
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
        let mut child = cmd.spawn().map_err(|e| {
            Error::Hook(format!("cannot start the {phase}-command {command:?}: {e}"))
        })?;
        let pgid = child.id() as i32;
        let killed_by_interrupt = phase == "pre";
        {
            let mut running = self.0.running.lock().unwrap();
            // An interrupt that came after the check in `run_hook` (or while the child
            // started) has already killed the hooks it found listed, and this one was not
            // listed yet: it is killed here instead. The flag is set before the interrupt
            // takes this lock, so one of the two always sees the other.
            if killed_by_interrupt && self.is_interrupted() {
                kill_group(pgid);
            }
            running.push(RunningHook {
                pgid,
                killed_by_interrupt,
            });
        }
        let _clear = ClearOnDrop(self, pgid);
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
                kill_group(pgid);
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
}

/// Takes a hook's process group off the running list when it ends.
struct ClearOnDrop<'a>(&'a Interrupt, i32);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        let state = &self.0 .0;
        state.running.lock().unwrap().retain(|h| h.pgid != self.1);
        state.hook_ended.notify_all();
    }
}

/// Kills a hook's whole process group.
fn kill_group(pgid: i32) {
    // SAFETY: kill(2) on a process group this process started; no memory is involved.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
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
        let r = Interrupt::new()
            .run_hook(
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
        let r = Interrupt::new()
            .run_hook(
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
        let r = Interrupt::new()
            .run_hook(
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

    /// A pre-command that got past `run_hook`'s check just before an interrupt, and so was not
    /// listed when the interrupt killed the running ones, is killed all the same.
    #[test]
    fn a_pre_command_started_during_an_interrupt_is_killed() {
        let i = Interrupt::new();
        assert!(i.interrupt().is_empty());
        let r = i
            .spawn_and_wait(
                "sleep 30",
                "pre",
                "v",
                Path::new("/"),
                None,
                Duration::from_secs(20),
            )
            .unwrap();
        assert!(!r.ok() && !r.timed_out, "{r:?}");
        assert!(r.seconds < 10.0, "{r:?}");
    }

    /// An interrupt leaves a post-command an ingest already started to finish (it thaws the VM
    /// or removes a snapshot), and returns only after it ended.
    #[test]
    fn an_interrupt_waits_for_a_running_post_command() {
        let t = tempfile::tempdir().unwrap();
        let started = t.path().join("started");
        let done = t.path().join("done");
        let i = Interrupt::new();
        let ingest = {
            let i = i.clone();
            let cmd = format!(
                "touch '{}'; sleep 1; echo thawed > '{}'",
                started.display(),
                done.display()
            );
            std::thread::spawn(move || {
                i.spawn_and_wait(
                    &cmd,
                    "post",
                    "v",
                    Path::new("/"),
                    Some("success"),
                    Duration::from_secs(20),
                )
            })
        };
        let t0 = Instant::now();
        while !started.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the post-command did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(i.interrupt().is_empty());
        assert_eq!(std::fs::read_to_string(&done).unwrap(), "thawed\n");
        assert!(ingest.join().unwrap().unwrap().ok());
    }
}
