//! The protection levels the engine runs a VM at.
//!
//! - `ft`: checkpoints of memory, CPU and disks; the standby resumes the
//!   VM from the last one without a reboot, and the guest's output leaves
//!   only once its checkpoint is acknowledged.
//! - `ha`: the disks alone are mirrored, synchronously (a guest write
//!   completes once both nodes have it); memory is not replicated and
//!   output is not held. The standby boots the VM from its mirror when
//!   the primary is lost.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    #[default]
    Ft,
    Ha,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ft => "ft",
            Level::Ha => "ha",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Level, String> {
        match s {
            "ft" => Ok(Level::Ft),
            "ha" => Ok(Level::Ha),
            other => Err(format!(
                "unknown protection level {other:?} (expected ft or ha)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_read_as_they_print() {
        for level in [Level::Ft, Level::Ha] {
            assert_eq!(level.to_string().parse::<Level>(), Ok(level));
        }
        assert!("unprotected".parse::<Level>().is_err());
    }
}
