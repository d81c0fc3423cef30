//! Percentiles, one rule for the whole project: nearest rank (the smallest
//! value such that at least `p` percent of the values are at or below it).

use std::collections::VecDeque;
use std::time::Duration;

/// The `p`-th percentile (nearest rank) of `values`; 0 when empty. Sorts
/// `values` in place.
pub fn percentile(values: &mut [u64], p: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// Recent samples of a duration, for percentiles.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    recent: VecDeque<u64>,
}

const SAMPLES_KEPT: usize = 4096;

impl Samples {
    pub fn push(&mut self, d: Duration) {
        if self.recent.len() == SAMPLES_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(d.as_micros() as u64);
    }

    /// The `p`-th percentile in microseconds (0 with no samples).
    pub fn percentile_us(&self, p: f64) -> u64 {
        let mut values: Vec<u64> = self.recent.iter().copied().collect();
        percentile(&mut values, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(percentile(&mut [], 50.0), 0);
        assert_eq!(percentile(&mut [5], 99.0), 5);
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&mut v.clone(), 50.0), 50);
        assert_eq!(percentile(&mut v.clone(), 99.0), 99);
        assert_eq!(percentile(&mut v.clone(), 100.0), 100);
        assert_eq!(percentile(&mut v.clone(), 0.0), 1);
        // Unsorted input, rank rounds up: 4 values, p50 -> rank 2.
        assert_eq!(percentile(&mut [40, 10, 30, 20], 50.0), 20);
        assert_eq!(percentile(&mut [40, 10, 30, 20], 51.0), 30);
    }

    #[test]
    fn samples_keep_the_most_recent() {
        let mut s = Samples::default();
        assert_eq!(s.percentile_us(50.0), 0);
        for _ in 0..SAMPLES_KEPT {
            s.push(Duration::from_micros(1_000));
        }
        for _ in 0..SAMPLES_KEPT {
            s.push(Duration::from_micros(7));
        }
        assert_eq!(s.percentile_us(100.0), 7);
    }
}
