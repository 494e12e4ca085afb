//! Orderly stop of the long-running commands (`mount`, `serve-nbd`) on Ctrl-C, `kill` or a
//! closed terminal: SIGINT, SIGTERM and SIGHUP are blocked in every thread and received by one
//! thread with `sigwait`, which then unmounts or stops serving instead of the process dying
//! with the filesystem still mounted or a socket file left behind.

use crate::error::{Error, Result};

/// The termination signals, blocked in the calling thread (and in every thread it spawns
/// afterwards, which inherit the mask).
pub struct TerminationSignals {
    set: libc::sigset_t,
}

impl TerminationSignals {
    /// Blocks SIGINT, SIGTERM and SIGHUP. Call before spawning the threads that must not see them.
    pub fn block() -> Result<TerminationSignals> {
        // SAFETY: sigset_t is plain data initialised by sigemptyset before use; the calls only
        // read and write the set and this thread's signal mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(Error::Usage(format!(
                    "cannot block termination signals: {}",
                    std::io::Error::from_raw_os_error(rc)
                )));
            }
            Ok(TerminationSignals { set })
        }
    }

    /// Waits for the next termination signal and returns its name.
    pub fn wait(&self) -> &'static str {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `self.set` is an initialised signal set; `sig` is a valid out pointer.
            let rc = unsafe { libc::sigwait(&self.set, &mut sig) };
            if rc == 0 {
                return match sig {
                    libc::SIGINT => "SIGINT",
                    libc::SIGTERM => "SIGTERM",
                    _ => "SIGHUP",
                };
            }
        }
    }
}

/// Undoes something on a remote host (removes a snapshot vmrepo took); returns what went wrong.
pub type Cleanup = Box<dyn FnOnce() -> std::result::Result<(), String> + Send>;

/// Keeps clean-ups owed until they run: the work that made them runs each when it ends, and an
/// interrupt runs all those still owed before the process exits.
pub trait OweCleanup {
    /// Registers `run` (described as `what`) as owed.
    fn owe_cleanup(&self, what: &str, run: Cleanup) -> Box<dyn OwedCleanup>;
}

/// One clean-up owed.
pub trait OwedCleanup: Send {
    /// Runs it now, unless an interrupt took it (then `None`: the interrupt runs it).
    fn run(self: Box<Self>) -> Option<std::result::Result<(), String>>;
}
