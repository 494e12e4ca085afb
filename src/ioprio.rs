//! The I/O priority of the process (`--io-priority`, what `ionice` sets): a backup that reads in
//! the idle class gets the disk only when no one else wants it, so the VMs on the same
//! datastore keep their latency. Set before any thread starts: threads inherit it.

/// An I/O scheduling class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoPriority {
    /// Only when the disk is otherwise idle.
    Idle,
    /// The normal class, at a level from 0 (highest) to 7 (lowest).
    BestEffort(u8),
}

impl IoPriority {
    /// Parses `idle`, `best-effort` (level 4, the kernel's default) or `best-effort:N`.
    pub fn parse(s: &str) -> Result<IoPriority, String> {
        match s.split_once(':') {
            None if s == "idle" => Ok(IoPriority::Idle),
            None if s == "best-effort" => Ok(IoPriority::BestEffort(4)),
            Some(("best-effort", n)) => match n.parse::<u8>() {
                Ok(n) if n <= 7 => Ok(IoPriority::BestEffort(n)),
                _ => Err(format!(
                    "{s:?}: the best-effort level is 0 (highest) to 7 (lowest)"
                )),
            },
            _ => Err(format!(
                "{s:?} is not an I/O priority: give idle, best-effort or best-effort:0..7"
            )),
        }
    }

    /// Applies it to the calling thread (and so to the threads it starts afterwards).
    pub fn apply(self) -> std::io::Result<()> {
        const WHO_PROCESS: libc::c_long = 1;
        const CLASS_SHIFT: u32 = 13;
        let value = match self {
            IoPriority::Idle => 3 << CLASS_SHIFT,
            IoPriority::BestEffort(n) => (2 << CLASS_SHIFT) | libc::c_long::from(n),
        };
        // SAFETY: ioprio_set(2) takes three integers and touches no memory of ours.
        let r =
            unsafe { libc::syscall(libc::SYS_ioprio_set, WHO_PROCESS, 0 as libc::c_long, value) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_parse_and_bad_ones_are_named() {
        assert_eq!(IoPriority::parse("idle"), Ok(IoPriority::Idle));
        assert_eq!(
            IoPriority::parse("best-effort"),
            Ok(IoPriority::BestEffort(4))
        );
        assert_eq!(
            IoPriority::parse("best-effort:7"),
            Ok(IoPriority::BestEffort(7))
        );
        assert!(IoPriority::parse("best-effort:8")
            .unwrap_err()
            .contains("0 (highest) to 7"));
        assert!(IoPriority::parse("realtime")
            .unwrap_err()
            .contains("idle, best-effort"));
    }
}
