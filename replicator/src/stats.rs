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
    sorted_percentile(values, p)
}

/// Recent samples of a duration, for percentiles. Kept in order of
/// arrival and, beside, sorted: a percentile is read at every checkpoint's
/// acknowledgement, and sorting the window each time cost a lab node (one
/// emulated CPU, shared with the guest) more than the rest of the
/// acknowledgement's work. A push moves at most the window's length of
/// values; a percentile is one index.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    recent: VecDeque<u64>,
    sorted: Vec<u64>,
}

const SAMPLES_KEPT: usize = 4096;

impl Samples {
    pub fn push(&mut self, d: Duration) {
        if self.recent.len() == SAMPLES_KEPT {
            if let Some(oldest) = self.recent.pop_front() {
                // It is there: every value in `recent` is in `sorted`.
                if let Ok(at) = self.sorted.binary_search(&oldest) {
                    self.sorted.remove(at);
                }
            }
        }
        let us = d.as_micros() as u64;
        self.recent.push_back(us);
        let at = self.sorted.partition_point(|&v| v <= us);
        self.sorted.insert(at, us);
    }

    /// The `p`-th percentile in microseconds (0 with no samples).
    pub fn percentile_us(&self, p: f64) -> u64 {
        sorted_percentile(&self.sorted, p)
    }
}

/// The `p`-th percentile (nearest rank) of `sorted`, sorted ascending; 0
/// when empty.
fn sorted_percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
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

    #[test]
    fn samples_give_the_percentiles_of_the_window_as_sorting_it_would() {
        // A window that wraps several times, with repeated values: each
        // percentile is the one sorting the last SAMPLES_KEPT values gives.
        let mut s = Samples::default();
        let mut all = Vec::new();
        let mut x: u64 = 12345;
        for i in 0..(SAMPLES_KEPT * 3 + 17) {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let us = (x >> 33) % 5000;
            s.push(Duration::from_micros(us));
            all.push(us);
            if i % 997 == 0 || i + 1 == SAMPLES_KEPT * 3 + 17 {
                let from = all.len().saturating_sub(SAMPLES_KEPT);
                let mut window = all[from..].to_vec();
                for p in [0.0, 1.0, 50.0, 99.0, 99.9, 100.0] {
                    assert_eq!(
                        s.percentile_us(p),
                        percentile(&mut window, p),
                        "p{p} at {i}"
                    );
                }
                assert_eq!(s.sorted.len(), window.len());
            }
        }
    }
}
