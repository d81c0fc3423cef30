//! Epoch sequencing on the receiving side: epochs must arrive exactly in
//! order, each once. A replayed (already applied) or out-of-order epoch is
//! refused, never applied.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SequenceError {
    #[error("epoch {got} was already applied (expected {expected}): a replay")]
    Replayed { got: u64, expected: u64 },
    #[error("epoch {got} arrived while {expected} was expected: epochs are missing or reordered")]
    Gap { got: u64, expected: u64 },
}

/// Tracks the next epoch the receiver may apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochSequencer {
    next: u64,
}

impl EpochSequencer {
    /// Starts expecting `first`.
    pub fn new(first: u64) -> Self {
        EpochSequencer { next: first }
    }

    pub fn expected(&self) -> u64 {
        self.next
    }

    /// Checks `epoch` without accepting it (a whole epoch is checked before
    /// it is applied).
    pub fn check(&self, epoch: u64) -> Result<(), SequenceError> {
        let expected = self.next;
        match epoch {
            e if e == expected => Ok(()),
            e if e < expected => Err(SequenceError::Replayed { got: e, expected }),
            e => Err(SequenceError::Gap { got: e, expected }),
        }
    }

    /// Records that `epoch` was applied (call only after [`check`](Self::check) passed).
    pub fn applied(&mut self, epoch: u64) {
        debug_assert_eq!(epoch, self.next);
        self.next = epoch + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_next_epoch_is_accepted() {
        let mut s = EpochSequencer::new(1);
        s.check(1).unwrap();
        s.applied(1);
        assert_eq!(
            s.check(1),
            Err(SequenceError::Replayed {
                got: 1,
                expected: 2
            })
        );
        assert_eq!(
            s.check(3),
            Err(SequenceError::Gap {
                got: 3,
                expected: 2
            })
        );
        s.check(2).unwrap();
        s.applied(2);
        assert_eq!(s.expected(), 3);
    }
}
