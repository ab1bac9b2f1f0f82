//! The exit statuses of both binaries (`master` and `worker`), one type so the
//! contract (0 ok, 1 failure, 2 usage or config error) is written once.

use std::process::ExitCode;

/// How a `master` or `worker` command ended, as its process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: it did what was asked.
    Ok,
    /// 1: it failed (a build failed, no agent running, the master
    /// unreachable, an I/O error).
    Failure,
    /// 2: the command line or a config file is wrong; nothing was changed.
    Usage,
}

impl ExitStatus {
    /// The numeric process exit code.
    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Ok => 0,
            ExitStatus::Failure => 1,
            ExitStatus::Usage => 2,
        }
    }
}

impl From<ExitStatus> for ExitCode {
    fn from(status: ExitStatus) -> ExitCode {
        ExitCode::from(status.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_documented_ones() {
        assert_eq!(ExitStatus::Ok.code(), 0);
        assert_eq!(ExitStatus::Failure.code(), 1);
        assert_eq!(ExitStatus::Usage.code(), 2);
    }
}
